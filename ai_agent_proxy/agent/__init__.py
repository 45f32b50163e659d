"""The agent's half of the house: from an inbox file to an answer in the chat.

The server's half (app, chat, relay, bodies, context, outbox, flusher, inbox writer) takes
a message to a file; this one takes files to answers: the conversations waiting and who
works on them (conversations.py), the short views an agent is shown (views.py), replies
sent once (replies.py), the same loop as MCP tools (mcp_server.py). It reads and writes
the outbox through db.py and never imports the app.
"""
