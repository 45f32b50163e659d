"""ai-agent-proxy: a durable OpenAI-compatible front for OpenClaw that turns every chat
request into a raw JSON file in a local agent's inbox."""

__version__ = "3.1.0"
