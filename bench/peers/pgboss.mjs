// pg-boss 12 (needs Node >= 22.12: run with node_modules/node/bin/node).
// N jobs added in one insert() call, then PROCESSES worker processes, each
// one work() with batchSize CONCURRENCY (the handler gets the batch and
// pg-boss completes it in one statement) and burstWhenBatchFull, so a
// worker fetches again at once while batches come back full. Timed from
// the workers' start until no job is left unfinished; as for
// graphile-worker, a measured startup/shutdown is subtracted (generous to
// pg-boss).
//
// node pgboss.mjs SERVER_URL JOBS PROCESSES CONCURRENCY
import { fork } from "node:child_process";
import { fileURLToPath } from "node:url";
import { readFileSync } from "node:fs";
import pg from "pg";
import { PgBoss } from "pg-boss";

const version = JSON.parse(
  readFileSync(new URL("./node_modules/pg-boss/package.json", import.meta.url)),
).version;

const QUEUE = "bench";
const [server, jobsArg = "200000", procArg = "4", concArg = "24", role = "main"] = process.argv.slice(2);
const jobs = Number(jobsArg), processes = Number(procArg), concurrency = Number(concArg);
const db = "bench_pgboss";
const url = `${server}/${db}`;

async function sql(connectionString, text, values) {
  const c = new pg.Client({ connectionString });
  await c.connect();
  try {
    return await c.query(text, values);
  } finally {
    await c.end();
  }
}

function boss() {
  return new PgBoss({ connectionString: url, max: concurrency + 1, schedule: false, supervise: false });
}

if (role === "worker") {
  const b = boss();
  b.on("error", (e) => console.error(e));
  await b.start();
  await b.work(QUEUE, { batchSize: concurrency, burstWhenBatchFull: true, pollingIntervalSeconds: 0.5 }, async () => {});
  process.send("ready");
  process.on("message", async () => {
    await b.stop({ graceful: true, wait: true });
    process.exit(0);
  });
} else {
  await sql(`${server}/postgres`, `DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
  await sql(`${server}/postgres`, `CREATE DATABASE ${db}`);
  const setup = boss();
  await setup.start();
  await setup.createQueue(QUEUE);

  const spawnWorkers = (n) =>
    Array.from({ length: n }, () => {
      const child = fork(fileURLToPath(import.meta.url), [server, jobsArg, procArg, concArg, "worker"]);
      const ready = new Promise((resolve) => child.once("message", resolve));
      const exited = new Promise((resolve) => child.once("exit", resolve));
      return { child, ready, exited };
    });
  const stopWorkers = async (ws) => {
    for (const w of ws) w.child.send("stop");
    await Promise.all(ws.map((w) => w.exited));
  };

  // Startup/shutdown on an empty queue.
  let t = process.hrtime.bigint();
  let ws = spawnWorkers(1);
  await ws[0].ready;
  await stopWorkers(ws);
  const startupMs = Number(process.hrtime.bigint() - t) / 1e6;

  t = process.hrtime.bigint();
  await setup.insert(QUEUE, Array.from({ length: jobs }, (_, i) => ({ data: { id: i + 1 } })));
  const addMs = Number(process.hrtime.bigint() - t) / 1e6;
  await setup.stop({ graceful: true, wait: true });
  await sql(url, "VACUUM ANALYZE");

  const unfinished = async () =>
    (await sql(url, `SELECT count(*)::int AS n FROM pgboss.job WHERE name = $1 AND state < 'completed'`, [QUEUE]))
      .rows[0].n;
  t = process.hrtime.bigint();
  ws = spawnWorkers(processes);
  const poll = new pg.Client({ connectionString: url });
  await poll.connect();
  for (;;) {
    const r = await poll.query(
      `SELECT EXISTS (SELECT 1 FROM pgboss.job WHERE name = $1 AND state < 'completed') AS busy`,
      [QUEUE],
    );
    if (!r.rows[0].busy) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  const runMs = Number(process.hrtime.bigint() - t) / 1e6;
  await poll.end();
  await stopWorkers(ws);
  const left = await unfinished();
  if (left !== 0) throw new Error(`${left} jobs unfinished`);
  const done = (await sql(url, `SELECT count(*)::int AS n FROM pgboss.job WHERE name = $1 AND state = 'completed'`, [QUEUE])).rows[0].n;
  if (done !== jobs) throw new Error(`${done} of ${jobs} jobs completed`);
  const rate = (1000 * jobs) / (runMs - startupMs);
  console.log(
    `bench: pg-boss ${version} (node ${process.version}): ${jobs} jobs added in one insert() in ${addMs.toFixed(0)} ms; ` +
      `startup/shutdown ${startupMs.toFixed(0)} ms; ${processes} processes x batchSize ${concurrency} took ` +
      `${runMs.toFixed(0)} ms: ${rate.toFixed(0)} jobs/s with startup subtracted ` +
      `(${((1000 * jobs) / runMs).toFixed(0)} jobs/s wall clock)`,
  );
  console.log(`RESULT queue pg-boss ${rate.toFixed(0)}`);
}
