// graphile-worker 0.17.3 settings of its own perf test (perfTest/graphile.config.js):
// 24 concurrent jobs per process, a pool of 25.
// Unbatched: the defaults (one job fetched per slot, completed one by one).
const path = require("node:path");

module.exports = {
  worker: {
    taskDirectory: path.join(__dirname, "..", "tasks"),
    fileExtensions: [".js"],
    concurrentJobs: 24,
    maxPoolSize: 25,

  },
};
