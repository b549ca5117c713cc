// graphile-worker 0.17.3 settings of its own perf test (perfTest/graphile.config.js):
// 24 concurrent jobs per process, a pool of 25.
// Batched: a local queue of 500 locked jobs, completions and failures batched.
const path = require("node:path");

module.exports = {
  worker: {
    taskDirectory: path.join(__dirname, "..", "tasks"),
    fileExtensions: [".js"],
    concurrentJobs: 24,
    maxPoolSize: 25,
    localQueue: { size: 500, refetchDelay: { durationMs: 10 } },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
};
