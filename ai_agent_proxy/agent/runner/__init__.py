"""The agent runner (`ai-agent-proxy agent`, SPEC section 8): the local runtime that hands
each waiting conversation to the agent CLI a person already uses, so that nothing needs
hand-written glue between "a message arrived" and "an answer was sent".

    scheduler.py  who runs next: slots, the quiet window, leases, retries, the answer check
    options.py    what `ai-agent-proxy agent` was told (presets, limits, the quiet window)
    command.py    what a run is started with: argv, environment, the record's masked command
    launch.py     a run's process: its own group, the prompt on stdin, limits, stop, reap
    runs.py       the rows: runs, sessions, a conversation's failures (all state is in the DB)
    prompt.py     what the agent is told: the conversation, the words marked untrusted
    adapters.py   one small adapter per CLI (claude, codex, opencode, gemini)
"""
