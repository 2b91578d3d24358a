"""The Vercel AI SDK (`ai` with `@ai-sdk/anthropic` and `@ai-sdk/openai`, pinned, installed by
`make ai-sdk`) against the real server on SmolLM2, on all three APIs: text, streamed text,
forced tool calls (streamed too) and their round trip, generateObject and streamObject, and a
tool under auto through the generic tool format (tests/clients/ai_sdk.mjs)."""

from conftest import ROOT, SMOLLM2, run_node

SDK_DIR = ROOT / ".cache" / "ai-sdk"


def test_the_ai_sdk(smollm2_server):
    out = run_node(
        "ai_sdk.mjs", SDK_DIR / "node_modules/ai", "ai-sdk",
        {"PENSIEVE_URL": smollm2_server.url, "MODEL": SMOLLM2.stem, "AI_SDK_DIR": str(SDK_DIR),
         "AI_SDK_LOG_WARNINGS": "false"},
        timeout=600,
    )
    assert out.count("ok: ") == 19, out
