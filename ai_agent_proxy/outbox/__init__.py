"""The outbox: every request is committed here before it is answered, and the flusher
takes its rows from here. `store.Outbox` is the async face the server uses; the write
thread is `engine`, the SQL is `queries`, start-up recovery is `maintenance`. (The package
itself imports nothing, so that the agent's commands read `queries` without loading the
server's async machinery: `reply` starts 30 ms sooner.)

New rows are leased to this process's flusher by their INSERT, and once committed they are
handed to it in memory (`listen`): the flusher does not read back what was just written.
Everything else (rows from before a restart, a dead worker's, backend outcomes, failed
writes) is claimed from the DB. Reads go through a second connection (WAL readers never
block the writer).
"""
