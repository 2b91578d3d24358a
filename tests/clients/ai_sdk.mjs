// The Vercel AI SDK (`ai` with `@ai-sdk/anthropic` and `@ai-sdk/openai`, pinned, installed by
// `make ai-sdk`) against a running pensieve on SmolLM2. Run by test_ai_sdk.py with PENSIEVE_URL,
// MODEL and AI_SDK_DIR set; exits non-zero on the first failed check, naming it.
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(path.join(process.env.AI_SDK_DIR, "package.json"));
const load = (name) => import(pathToFileURL(require.resolve(name)).href);
const { generateText, streamText, generateObject, streamObject, tool, jsonSchema } = await load("ai");
const { createAnthropic } = await load("@ai-sdk/anthropic");
const { createOpenAI } = await load("@ai-sdk/openai");
const { z } = await load("zod");

const baseURL = `${process.env.PENSIEVE_URL}/v1`;
const anthropic = createAnthropic({ baseURL, apiKey: "sk-local" });
const openai = createOpenAI({ baseURL, apiKey: "sk-local" });
const name = process.env.MODEL;
const models = {
  "anthropic messages": anthropic(name),
  "openai chat": openai.chat(name),
  "openai responses": openai.responses(name),
};

// An open schema (no additionalProperties), as a zod object turns into: the forced call must
// still be one call with the listed key.
const weather = tool({
  description: "Get the current weather in a city",
  inputSchema: z.object({ city: z.string().describe("The city") }),
  execute: async ({ city }) => `18 C and sunny in ${city}`,
});
// Ordered: the reasoning before the answer.
const verdict = z.object({ reasoning: z.string().max(80), answer: z.enum(["yes", "no"]) });
const ask = "Is 17 a prime number? Think first.";
const checks = {};

for (const [api, model] of Object.entries(models)) {
  checks[`${api}: generateText`] = async () => {
    const r = await generateText({ model, prompt: "What is the capital of France?", maxOutputTokens: 24, temperature: 0 });
    assert.ok(r.text.length > 0, "no text");
    assert.ok(r.usage.inputTokens > 0 && r.usage.outputTokens > 0, JSON.stringify(r.usage));
  };

  checks[`${api}: streamText has no empty text part`] = async () => {
    const r = streamText({ model, prompt: "Name a colour.", maxOutputTokens: 12, temperature: 0 });
    const parts = [];
    for await (const p of r.fullStream) parts.push(p);
    const deltas = parts.filter((p) => p.type === "text-delta");
    assert.ok(deltas.length > 1, "streamed in pieces");
    assert.ok(deltas.every((p) => p.text.length > 0), "an empty text delta");
    assert.equal(parts.filter((p) => p.type === "text-start").length, 1, "one text part");
  };

  checks[`${api}: a forced tool call and its round trip`] = async () => {
    const r = await generateText({
      model, prompt: "What is the weather in Paris?", tools: { weather }, toolChoice: "required",
      maxOutputTokens: 48, temperature: 0,
    });
    assert.equal(r.toolCalls.length, 1, JSON.stringify(r.content));
    assert.equal(r.toolCalls[0].toolName, "weather");
    assert.deepEqual(Object.keys(r.toolCalls[0].input), ["city"]);
    assert.match(r.toolCalls[0].input.city, /Paris/);
    assert.equal(r.toolResults[0].output, `18 C and sunny in ${r.toolCalls[0].input.city}`);
    assert.ok(!r.content.some((p) => p.type === "text" && p.text === ""), "an empty text part");
    // The result goes back: the model answers (text or another call), and the request holds.
    const next = await generateText({
      model, messages: [{ role: "user", content: "What is the weather in Paris?" }, ...r.response.messages],
      tools: { weather }, maxOutputTokens: 32, temperature: 0,
    });
    assert.ok(next.content.length > 0, "no answer after the tool result");
  };

  checks[`${api}: a streamed forced call streams its input`] = async () => {
    const r = streamText({
      model, prompt: "What is the weather in Paris?", tools: { weather }, toolChoice: "required",
      maxOutputTokens: 48, temperature: 0,
    });
    const parts = [];
    for await (const p of r.fullStream) parts.push(p);
    const deltas = parts.filter((p) => p.type === "tool-input-delta");
    assert.ok(deltas.length >= 3, `input in ${deltas.length} delta(s): ${JSON.stringify(parts.map((p) => p.type))}`);
    const call = parts.find((p) => p.type === "tool-call");
    assert.equal(call.toolName, "weather");
    assert.deepEqual(JSON.parse(deltas.map((d) => d.delta).join("")), call.input);
    assert.ok(!parts.some((p) => p.type === "text-start"), "a text part beside the call");
  };

  checks[`${api}: generateObject keeps the schema's order`] = async () => {
    const r = await generateObject({ model, schema: verdict, prompt: ask, maxOutputTokens: 80, temperature: 0 });
    assert.deepEqual(Object.keys(r.object), ["reasoning", "answer"]);
    assert.ok(["yes", "no"].includes(r.object.answer));
  };

  checks[`${api}: streamObject gives partial objects`] = async () => {
    const r = streamObject({ model, schema: verdict, prompt: ask, maxOutputTokens: 80, temperature: 0 });
    const partials = [];
    for await (const p of r.partialObjectStream) partials.push(p);
    assert.ok(partials.length >= 3, `${partials.length} partial(s)`);
    const final = await r.object;
    assert.deepEqual(Object.keys(final), ["reasoning", "answer"]);
  };
}

checks["openai chat: a tool with a JSON schema under auto"] = async () => {
  // The generic tool format lets SmolLM2 call under auto: at least once in five tries.
  const open = tool({
    description: "Get the current weather in a city",
    inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } }, required: ["city"] }),
  });
  let calls = 0;
  for (let i = 0; i < 5; i++) {
    const r = await generateText({
      model: models["openai chat"], prompt: "What is the weather in Paris?", tools: { weather: open },
      maxOutputTokens: 48, temperature: 0.7,
    });
    calls += r.toolCalls.length;
  }
  assert.ok(calls >= 1, "no call in five tries");
};

let failed = 0;
for (const [label, check] of Object.entries(checks)) {
  try {
    await check();
    console.log(`ok: ${label}`);
  } catch (e) {
    failed += 1;
    console.log(`FAILED: ${label}: ${e.stack || e}`);
  }
}
process.exit(failed ? 1 : 0);
