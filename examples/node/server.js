// A worker in Node.js: takes its listening socket from fd 3 (systemd's LISTEN_FDS).
//
// Run under dream:  dream serve --listen :8080 --ready auto:500ms -- node server.js
// Node has no Unix datagram sockets for READY=1, so readiness is by time (auto:DUR).
//
// On SIGTERM it drains without breaking a client (doc/protocol.md, "Draining"):
//  1. stop accepting, but leave open connections alone: http.Server#close()
//     would also close idle keep-alive connections at once (Node >= 19), and a
//     client may be sending on one at that very moment, so only the listening
//     socket is closed (net.Server#close);
//  2. answer each further request with "Connection: close", so keep-alive
//     clients reconnect, to the next generation;
//  3. after a grace, close the connections that stayed idle;
//  4. exit once every connection is closed.
"use strict";
const http = require("http");
const net = require("net");

const release = process.env.DREAM_RELEASE || "dev";
const generation = process.env.DREAM_GENERATION || "0";
if (process.env.LISTEN_PID !== String(process.pid)) {
  console.error("no sockets from dream (LISTEN_PID is not this process)");
  process.exit(1);
}
let draining = false;
const server = http.createServer((req, res) => {
  const body = `<p>release ${release}</p>\n`;
  const headers = {
    "Content-Type": "text/html",
    "Content-Length": Buffer.byteLength(body),
    "X-Dream-Release": release,
    "X-Dream-Generation": generation,
  };
  if (draining) headers["Connection"] = "close";
  res.writeHead(200, headers);
  res.end(body);
});
server.listen({ fd: 3 });
process.on("SIGTERM", () => {
  draining = true;
  net.Server.prototype.close.call(server, () => process.exit(0));
  setTimeout(() => server.closeIdleConnections(), 1000);
});
