// The official socket.io-client, with no recovery code of its own, for test_socketio_js.py.
//
//   node recovering_client.cjs URL ROOM DROP_AT [PACKAGE]
//
// Joins ROOM on every connect that did not recover; records each "tick" argument; kills its
// own transport (TCP reset, no close frame) when it has DROP_AT ticks, once; on "done" prints
// one JSON line {received, recovered, connects} and exits. Every connect is printed as a JSON
// line {connect: id, recovered} so the test can follow.
"use strict";

const [url, room, dropAt, pkg] = process.argv.slice(2);
const { io } = require(pkg || "socket.io-client");

const socket = io(url, {
  transports: ["websocket"],
  reconnectionDelay: Number(process.env.RECONNECTION_DELAY || 100),
  reconnectionDelayMax: Number(process.env.RECONNECTION_DELAY || 100),
  randomizationFactor: 0,
});
const received = [];
const connects = [];
let dropped = false;

socket.on("connect", () => {
  connects.push({ id: socket.id, recovered: socket.recovered });
  console.log(JSON.stringify({ connect: socket.id, recovered: socket.recovered }));
  if (!socket.recovered) {
    socket.emit("join", room, () => console.log(JSON.stringify({ joined: socket.id })));
  }
});

socket.on("tick", (n) => {
  received.push(n);
  if (!dropped && received.length === Number(dropAt)) {
    dropped = true;
    socket.io.engine.transport.ws._socket.destroy(); // the network is gone
  }
});

socket.on("done", () => {
  console.log(JSON.stringify({ received, recovered: socket.recovered, connects }));
  socket.disconnect();
  process.exit(0);
});

setTimeout(() => {
  console.log(JSON.stringify({ timeout: true, received, connects }));
  process.exit(1);
}, Number(process.env.CLIENT_TIMEOUT || 20000));
