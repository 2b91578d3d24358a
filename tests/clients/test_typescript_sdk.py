"""The official TypeScript SDK (`@anthropic-ai/sdk`, pinned, installed by `make ts-sdk`) against
the real server: create, stream with finalMessage(), countTokens, a forced tool round trip and
the tool runner with a forced tool (tests/clients/sdk_ts.mjs)."""

from conftest import ROOT, run_node

SDK_DIR = ROOT / ".cache" / "anthropic-sdk-ts"


def test_the_typescript_sdk(server):
    out = run_node("sdk_ts.mjs", SDK_DIR / "node_modules/@anthropic-ai/sdk", "ts-sdk",
                   {"PENSIEVE_URL": server.url, "SDK_DIR": str(SDK_DIR)})
    assert out.count("ok: ") == 5, out
