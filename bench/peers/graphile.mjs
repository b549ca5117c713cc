// graphile-worker 0.17.3 in the shape of its own perf test (perfTest/run.js):
// time startup/shutdown on an empty queue, add N jobs in one call
// (graphile_worker.add_jobs), then time PROCESSES × `graphile-worker --once
// -j 24 -m 25` until the queue is empty. Jobs per second is the perf test's
// formula, N / (duration − startup), which is generous to graphile-worker.
//
// node graphile.mjs SERVER_URL JOBS PROCESSES CONCURRENCY batched|unbatched
import { execFileSync, execFile } from "node:child_process";
import { promisify } from "node:util";
import path from "node:path";
import { fileURLToPath } from "node:url";
import pg from "pg";

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const [server, jobsArg = "200000", procArg = "4", concArg = "24", mode = "batched"] =
  process.argv.slice(2);
const jobs = Number(jobsArg), processes = Number(procArg), concurrency = Number(concArg);
const db = `bench_graphile_${mode}`;
const url = `${server}/${db}`;
const cli = path.join(here, "node_modules", "graphile-worker", "dist", "cli.js");
const cwd = path.join(here, `graphile-${mode}`);
const env = { ...process.env, NO_LOG_SUCCESS: "1", DATABASE_URL: url };

async function sql(connectionString, text, values) {
  const c = new pg.Client({ connectionString });
  await c.connect();
  try {
    return await c.query(text, values);
  } finally {
    await c.end();
  }
}

const worker = () =>
  run(process.execPath, [cli, "--once", "-c", url, "-j", String(concurrency), "-m", String(concurrency + 1)], { cwd, env });

await sql(`${server}/postgres`, `DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
await sql(`${server}/postgres`, `CREATE DATABASE ${db}`);
execFileSync(process.execPath, [cli, "--schema-only", "-c", url], { cwd, env, stdio: "inherit" });

let t = process.hrtime.bigint();
await worker();
const startupMs = Number(process.hrtime.bigint() - t) / 1e6;

t = process.hrtime.bigint();
await sql(
  url,
  `SELECT graphile_worker.add_jobs(array(
     SELECT ('noop', json_build_object('id', i), NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
     FROM generate_series(1, $1) i))`,
  [jobs],
);
const addMs = Number(process.hrtime.bigint() - t) / 1e6;
await sql(url, "VACUUM ANALYZE");

t = process.hrtime.bigint();
await Promise.all(Array.from({ length: processes }, worker));
const runMs = Number(process.hrtime.bigint() - t) / 1e6;

const left = await sql(url, "SELECT count(*)::int AS n FROM graphile_worker._private_jobs");
if (left.rows[0].n !== 0) throw new Error(`${left.rows[0].n} jobs left in the queue`);
const perfTest = (1000 * jobs) / (runMs - startupMs);
const wall = (1000 * jobs) / runMs;
console.log(
  `bench: graphile-worker ${mode}: ${jobs} jobs added in one add_jobs call in ${addMs.toFixed(0)} ms; ` +
    `startup/shutdown ${startupMs.toFixed(0)} ms; ${processes} processes x -j ${concurrency} took ` +
    `${runMs.toFixed(0)} ms: ${perfTest.toFixed(0)} jobs/s by its perf test's formula ` +
    `(${wall.toFixed(0)} jobs/s wall clock)`,
);
console.log(`RESULT queue graphile-worker-${mode} ${perfTest.toFixed(0)}`);
