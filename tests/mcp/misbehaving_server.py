# A tiny MCP server (stdio, JSON-RPC lines, standard library only) that misbehaves on request,
# for tests/tests/mcp.rs: each tool does one bad thing a real server might do.
import json
import os
import sys
import time

INSTANCE = os.urandom(4).hex()
TOOLS = [
    ("ok", "answers with the id of this server instance"),
    ("crash", "exits at once, code 3"),
    ("hang", "never answers"),
    ("garbage", "prints a line that is not JSON-RPC"),
    ("flood", "prints one 8 MiB line"),
]


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    mid, method = msg.get("id"), msg.get("method")
    if mid is None:
        continue
    params = msg.get("params") or {}
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {
            "protocolVersion": params.get("protocolVersion", "2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "misbehaving", "version": "1"},
        }})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": [
            {"name": n, "description": d, "inputSchema": {"type": "object", "properties": {}}}
            for n, d in TOOLS
        ]}})
    elif method == "tools/call":
        name = params.get("name")
        if name == "ok":
            send({"jsonrpc": "2.0", "id": mid, "result": {
                "content": [{"type": "text", "text": "fine from instance " + INSTANCE}],
            }})
        elif name == "crash":
            sys.stderr.write("misbehaving: crashing on purpose\n")
            sys.stderr.flush()
            sys.exit(3)
        elif name == "hang":
            time.sleep(3600)
        elif name == "garbage":
            sys.stdout.write("Traceback (most recent call last): this is not JSON-RPC\n")
            sys.stdout.flush()
        elif name == "flood":
            sys.stdout.write("x" * (8 << 20))
            sys.stdout.flush()
    else:
        send({"jsonrpc": "2.0", "id": mid,
              "error": {"code": -32601, "message": "method not found: " + str(method)}})
