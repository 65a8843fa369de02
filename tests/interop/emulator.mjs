// Starts the npm Firestore emulator (@firestore-emulator/server) on a loopback port for
// paywatch's interop tests (tests/interop.rs).
//
// Usage: node emulator.mjs [PORT]   (or FIRESTORE_EMULATOR_PORT=PORT; 0 or nothing = any free port)
// Prints "ready 127.0.0.1:PORT" on stdout once it accepts connections. Exits when stdin closes
// (the test process died) or on SIGTERM/SIGINT.
//
// FirestoreServer.start(port) binds 0.0.0.0; tests must stay on loopback, so this binds the
// server's gRPC server itself on 127.0.0.1, with the grpc-js copy the emulator uses.
import { createRequire } from "node:module";
import { FirestoreServer } from "@firestore-emulator/server";

const require = createRequire(import.meta.url);
const emulatorEntry = require.resolve("@firestore-emulator/server");
const { ServerCredentials } = createRequire(emulatorEntry)("@grpc/grpc-js");

const requested = process.argv[2] ?? process.env.FIRESTORE_EMULATOR_PORT ?? "0";
const port = Number.parseInt(requested, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`emulator.mjs: port '${requested}' is not a number from 0 to 65535`);
  process.exit(2);
}

const emulator = new FirestoreServer();
// Every Listen stream adds three listeners to one EventEmitter and Node warns past 10.
emulator.state?.emitter?.setMaxListeners?.(0);
// `server` is a TypeScript-private field of FirestoreServer (0.3.15); fail loudly if it moved.
const grpcServer = emulator.server;
if (!grpcServer || typeof grpcServer.bindAsync !== "function") {
  console.error("emulator.mjs: this @firestore-emulator/server version has no .server; update the launcher");
  process.exit(2);
}

grpcServer.bindAsync(`127.0.0.1:${port}`, ServerCredentials.createInsecure(), (error, bound) => {
  if (error) {
    console.error(`emulator.mjs: could not listen on 127.0.0.1:${port}: ${error.message}`);
    process.exit(1);
  }
  console.log(`ready 127.0.0.1:${bound}`);
});

const stop = () => {
  emulator.stop();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
process.stdin.on("end", stop);
process.stdin.on("close", stop);
process.stdin.resume();
