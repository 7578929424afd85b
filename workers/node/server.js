// node — an HTTP server on Node.js's own `http` module (Debian's nodejs), behind tqproxy.
//
// - Listens on 127.0.0.1:$PORT; or, when tqproxy passed the socket (LISTEN_FDS=1, as with a
//   network namespace or `transport: unix`), on fd 3.
// - SIGTERM is graceful: stop accepting (server.close), close idle keep-alive connections,
//   answer the requests in flight with `Connection: close`, exit once they are done. A second
//   SIGTERM exits at once. (tqproxy drains an instance before it signals it, so normally
//   nothing is in flight by then; after stop_timeout it sends SIGKILL.)
// - keepAliveTimeout stays above tqproxy's upstream_idle_timeout (30s): tqproxy closes idle
//   pooled connections first.
//
//   GET /health       ok
//   GET /slow?ms=N    "slow done" after N ms (at most 60000)
//   anything else     hello from node <name> instance <id> generation <gen> (pid <pid>)
'use strict';

const http = require('http');

const clean = (v, d) => (v || '').replace(/[^\x20-\x7e]/g, '') || d;
const NAME = clean(process.env.WORKER_NAME, 'node');
const INSTANCE = clean(process.env.WORKER_INSTANCE, '0');
const GENERATION = clean(process.env.WORKER_GENERATION, '0');

let stopping = false;

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://worker');
  const reply = (status, body) => {
    res.writeHead(status, {
      'Content-Type': 'text/plain',
      'Content-Length': Buffer.byteLength(body),
      'X-Instance': INSTANCE,
      'X-Generation': GENERATION,
      ...(stopping ? { Connection: 'close' } : {}),
    });
    res.end(body);
  };
  if (url.pathname === '/health') return reply(200, 'ok\n');
  if (url.pathname === '/slow') {
    const ms = Number(url.searchParams.get('ms') ?? 100);
    if (!Number.isInteger(ms) || ms < 0 || ms > 60000) return reply(400, 'ms: 0 to 60000\n');
    return setTimeout(() => reply(200, 'slow done\n'), ms);
  }
  reply(200, `hello from node ${NAME} instance ${INSTANCE} generation ${GENERATION} (pid ${process.pid})\n`);
});
server.keepAliveTimeout = 75_000;
server.headersTimeout = 80_000;

const passed = process.env.LISTEN_FDS === '1';
const where = passed ? { fd: 3 } : { host: '127.0.0.1', port: Number(process.env.PORT) };
if (!passed && !(where.port > 0)) {
  console.error('node: PORT is not set (and no socket passed as fd 3)');
  process.exit(1);
}
server.listen(where, () => {
  console.error(`node: instance ${INSTANCE} gen ${GENERATION} listening on ${passed ? 'fd 3' : `127.0.0.1:${where.port}`} (pid ${process.pid})`);
});

process.on('SIGTERM', () => {
  if (stopping) process.exit(0);
  stopping = true;
  console.error('node: SIGTERM: finishing the requests in flight');
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
