// Conformance checks of an oshepherd gateway through the official ollama-js client.
//
//   node tests/js/conformance.mjs <gateway-url> <check>      (or OSHEPHERD_URL=<url>)
//
// Each check asserts what the client itself relies on (streams end with `done` or
// `success`, errors carry the status) and prints one JSON line summarizing what it saw, for
// tests/test_ollama_js.py to compare with the fleet. A failed check exits 1 with the reason
// on stderr; bad arguments exit 2.
import assert from "node:assert/strict";
import { Ollama } from "ollama";

const USER = [{ role: "user", content: "hello" }];

// Read a stream to its end and return its parts: the client itself throws unless the
// stream ends with `done` or `status: "success"`.
async function drain(stream) {
  const parts = [];
  for await (const part of stream) parts.push(part);
  return parts;
}

// Read `keep` parts of a long chat stream, `stop` it, and report how the iteration ended.
async function abortAfter(ollama, keep, stop) {
  const stream = await ollama.chat({ model: "llama3", messages: USER, stream: true });
  let parts = 0;
  try {
    for await (const part of stream) {
      assert.equal(part.done, false, "the stream ended before it was aborted");
      if (++parts === keep) stop(stream);
    }
  } catch (error) {
    return { parts, error: error.name };
  }
  throw new Error(`the stream ended without an error after ${parts} parts`);
}

const checks = {
  async list(ollama) {
    const { models } = await ollama.list();
    return { models: models.map((m) => m.name).sort() };
  },

  async chat(ollama) {
    const parts = await drain(await ollama.chat({ model: "qwen2:7b", messages: USER, stream: true }));
    assert.ok(parts.slice(0, -1).every((p) => !p.done), "done before the last part");
    const last = parts.at(-1);
    assert.equal(last.done, true);
    const content = parts.map((p) => p.message.content).join("");
    return { content, model: last.model, done_reason: last.done_reason, eval_count: last.eval_count };
  },

  async generate(ollama) {
    const reply = await ollama.generate({ model: "llama3", prompt: "hi", stream: false });
    return { response: reply.response, done: reply.done, model: reply.model, context: reply.context };
  },

  async embed(ollama) {
    const { embeddings } = await ollama.embed({ model: "shared:7b", input: ["a", "b"] });
    const norms = embeddings.map((v) => Math.round(Math.hypot(...v) * 1e6) / 1e6);
    return { count: embeddings.length, dims: embeddings.map((v) => v.length), norms };
  },

  async show(ollama) {
    const shown = await ollama.show({ model: "llama3" });
    return { family: shown.details.family, capabilities: shown.capabilities };
  },

  async version(ollama) {
    return await ollama.version();
  },

  // ollama-js sends pulls as {name, stream}: no `model` field.
  async pull(ollama) {
    const parts = await drain(await ollama.pull({ model: "jspull:1b", stream: true }));
    const { models } = await ollama.list();
    const layer = parts.filter((p) => p.digest).at(-1);
    return {
      last: parts.at(-1).status,
      layer: { total: layer.total, completed: layer.completed },
      listed: models.some((m) => m.name === "jspull:1b"),
    };
  },

  // create, copy, push and delete, each with the JSON shape ollama-js sends.
  async manage(ollama) {
    const created = await drain(await ollama.create({ model: "jsmade", from: "shared:7b", stream: true }));
    await ollama.copy({ source: "jsmade", destination: "jscopy" });
    const pushed = await ollama.push({ model: "jscopy", stream: false });
    const listed = (await ollama.list()).models.map((m) => m.name);
    await ollama.delete({ model: "jsmade" });
    await ollama.delete({ model: "jscopy" });
    const left = (await ollama.list()).models.map((m) => m.name);
    const found = (names) => ["jsmade:latest", "jscopy:latest"].filter((n) => names.includes(n));
    return { created: created.at(-1).status, pushed: pushed.status, listed: found(listed), left: found(left) };
  },

  async "missing-model"(ollama) {
    const error = await ollama.generate({ model: "nope:1b", prompt: "x" }).then(
      () => assert.fail("generate of an unknown model succeeded"),
      (e) => e,
    );
    return { name: error.name, status_code: error.status_code, error: error.error };
  },

  // Stop a long stream with the client-wide abort(), then with the stream's own.
  async abort(ollama) {
    return await abortAfter(ollama, 2, () => ollama.abort());
  },

  async "abort-stream"(ollama) {
    return await abortAfter(ollama, 2, (stream) => stream.abort());
  },
};

async function main(args) {
  const [url, name] = args.length === 1 ? [process.env.OSHEPHERD_URL, args[0]] : args;
  const check = Object.hasOwn(checks, name ?? "") ? checks[name] : undefined;
  if (!url || !check) {
    console.error(`usage: node conformance.mjs <gateway-url> <${Object.keys(checks).join("|")}>`);
    process.exit(2);
  }
  try {
    const result = await check(new Ollama({ host: url }));
    console.log(JSON.stringify({ check: name, ...result }));
  } catch (error) {
    console.error(`check ${name} failed: ${error.stack ?? error}`);
    process.exit(1);
  }
}

await main(process.argv.slice(2));
