// The official TypeScript SDK (@anthropic-ai/sdk, pinned, installed by `make ts-sdk`) against a
// running pensieve on the demo model. Run by test_typescript_sdk.py with PENSIEVE_URL and
// SDK_DIR set; exits non-zero on the first failed check, naming it.
import assert from "node:assert/strict";
import { pathToFileURL } from "node:url";
import path from "node:path";

const sdk = (p) => import(pathToFileURL(path.join(process.env.SDK_DIR, "node_modules/@anthropic-ai/sdk", p)).href);
const { default: Anthropic } = await sdk("index.mjs");
const { betaTool } = await sdk("helpers/beta/json-schema.mjs");

const client = new Anthropic({ baseURL: process.env.PENSIEVE_URL, apiKey: "sk-local", maxRetries: 0 });
const hello = [{ role: "user", content: "Hello there" }];
const zone = {
  type: "object",
  additionalProperties: false,
  required: ["zone"],
  properties: { zone: { enum: ["UTC", "CET", "JST"] } },
};
const checks = {};

checks["messages.create"] = async () => {
  const m = await client.messages.create({ model: "x", max_tokens: 12, temperature: 0, messages: hello });
  assert.equal(m.type, "message");
  assert.equal(m.content[0].type, "text");
  assert.equal(m.stop_reason, "max_tokens");
  assert.equal(m.usage.output_tokens, 12);
};

checks["messages.stream and finalMessage()"] = async () => {
  const stream = client.messages.stream({ model: "x", max_tokens: 16, temperature: 0, messages: hello });
  let text = "";
  stream.on("text", (t) => (text += t));
  const final = await stream.finalMessage();
  assert.ok(text.length > 0);
  assert.equal(final.content[0].text, text);
  assert.equal(final.usage.output_tokens, 16);
};

checks["messages.countTokens equals usage"] = async () => {
  const { input_tokens } = await client.messages.countTokens({ model: "x", messages: hello });
  const m = await client.messages.create({ model: "x", max_tokens: 2, messages: hello });
  assert.equal(input_tokens, m.usage.input_tokens + m.usage.cache_read_input_tokens);
};

checks["a forced tool round trip"] = async () => {
  const tools = [{ name: "get_time", description: "The time in a zone", input_schema: zone }];
  const messages = [{ role: "user", content: "What time is it?" }];
  const first = await client.messages.create({
    model: "x", max_tokens: 40, tools, tool_choice: { type: "tool", name: "get_time" }, messages,
  });
  assert.equal(first.stop_reason, "tool_use");
  const call = first.content.find((b) => b.type === "tool_use");
  assert.equal(call.name, "get_time");
  assert.ok(["UTC", "CET", "JST"].includes(call.input.zone), JSON.stringify(call.input));
  messages.push({ role: "assistant", content: first.content });
  messages.push({ role: "user", content: [{ type: "tool_result", tool_use_id: call.id, content: "12:00" }] });
  const second = await client.messages.create({ model: "x", max_tokens: 8, tools, messages });
  assert.equal(second.role, "assistant");
  const prompt = (m) => m.usage.input_tokens + m.usage.cache_read_input_tokens;
  assert.ok(prompt(second) > prompt(first), "the second turn holds the first");
};

checks["toolRunner with a forced tool"] = async () => {
  const seen = [];
  const getTime = betaTool({
    name: "get_time",
    description: "The time in a zone",
    inputSchema: zone,
    run: async ({ zone }) => {
      seen.push(zone);
      return `12:00 ${zone}`;
    },
  });
  const runner = client.beta.messages.toolRunner({
    model: "x", max_tokens: 40, max_iterations: 3, tools: [getTime],
    tool_choice: { type: "tool", name: "get_time" },
    messages: [{ role: "user", content: "What time is it?" }],
  });
  let n = 0;
  for await (const message of runner) {
    n += 1;
    assert.equal(message.stop_reason, "tool_use");
  }
  assert.equal(n, 3);
  assert.ok(seen.length >= 2 && seen.every((z) => ["UTC", "CET", "JST"].includes(z)), JSON.stringify(seen));
};

for (const [name, check] of Object.entries(checks)) {
  try {
    await check();
    console.log(`ok: ${name}`);
  } catch (e) {
    console.error(`FAILED: ${name}: ${e.stack || e}`);
    process.exit(1);
  }
}
