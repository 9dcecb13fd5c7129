// A worker in Node.js: takes its listening socket from fd 3 (systemd's LISTEN_FDS).
//
// Run under dream:  dream serve --listen :8080 --ready auto:500ms -- node server.js
// Node has no Unix datagram sockets for READY=1, so readiness is by time (auto:DUR).
// On SIGTERM it stops accepting, lets requests in flight finish, closes idle
// keep-alive connections, and exits.
"use strict";
const http = require("http");

const release = process.env.DREAM_RELEASE || "dev";
if (process.env.LISTEN_PID !== String(process.pid)) {
  console.error("no sockets from dream (LISTEN_PID is not this process)");
  process.exit(1);
}
const server = http.createServer((req, res) => {
  const body = `<p>release ${release}</p>\n`;
  res.writeHead(200, {
    "Content-Type": "text/html",
    "Content-Length": Buffer.byteLength(body),
    "X-Dream-Release": release,
  });
  res.end(body);
});
server.listen({ fd: 3 });
process.on("SIGTERM", () => {
  server.close(() => process.exit(0));
  // Idle keep-alive connections get a short grace: a client may be sending.
  setTimeout(() => server.closeIdleConnections(), 300);
});
