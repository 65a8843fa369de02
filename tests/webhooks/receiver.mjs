// A merchant's endpoint for paywatch's URL hook tests (tests/url_hooks.rs): it verifies each
// delivery with the reference Standard Webhooks library (npm `standardwebhooks`), answers with
// the next scripted status, and prints one JSON line per request on stdout. The same protocol
// as receiver.py:
//
//   node receiver.mjs --secret whsec_... [--secret whsec_...] [--answers 500,200] [--location URL]
//
// prints `listening PORT`, then per request its headers, body, the library's verdict per secret
// (null: verified), and its verdicts on the delivery with its body tampered with, with its
// timestamp header changed, and received 6 minutes later. Runs until stdin closes.

import http from "node:http";
import { Webhook } from "standardwebhooks";

const secrets = [];
let answers = [];
let location = "http://127.0.0.1:9/elsewhere";
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  if (argv[i] === "--secret") secrets.push(argv[i + 1]);
  else if (argv[i] === "--answers") answers = argv[i + 1].split(",").filter(Boolean).map(Number);
  else if (argv[i] === "--location") location = argv[i + 1];
}

function verdict(secret, body, headers) {
  try {
    new Webhook(secret).verify(body, headers);
    return null;
  } catch (error) {
    return `${error.name}: ${error.message}`;
  }
}

const server = http.createServer((request, response) => {
  const chunks = [];
  request.on("data", (chunk) => chunks.push(chunk));
  request.on("end", () => {
    const body = Buffer.concat(chunks);
    const headers = request.headers;
    const verified = secrets.map((secret) => verdict(secret, body, headers));
    const tamperedBody = verdict(
      secrets[0],
      Buffer.from(body.toString("utf8").replace('"amount":"', '"amount":"9')),
      headers,
    );
    const moved = { ...headers, "webhook-timestamp": String(Number(headers["webhook-timestamp"]) - 1) };
    const tamperedTimestamp = verdict(secrets[0], body, moved);
    const realNow = Date.now;
    Date.now = () => realNow() + 6 * 60 * 1000;
    let stale;
    try {
      stale = verdict(secrets[0], body, headers);
    } finally {
      Date.now = realNow;
    }
    const status = answers.length ? answers.shift() : 200;
    const reply = status >= 300 ? "refused by the test receiver" : "ok";
    const extra = status >= 300 && status < 400 ? { location } : {};
    response.writeHead(status, { "content-length": Buffer.byteLength(reply), ...extra });
    response.end(reply);
    process.stdout.write(
      JSON.stringify({
        path: request.url,
        headers,
        body: body.toString("utf8"),
        verified,
        tampered_body: tamperedBody,
        tampered_timestamp: tamperedTimestamp,
        stale,
        status,
      }) + "\n",
    );
  });
});

server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
