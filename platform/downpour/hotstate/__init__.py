"""Redis, the one home of the server's hot shared state.

Everything that several server processes share through Redis lives here: the parameter
store's storage backend (``store``), per-token connection caps and per-agent push rates
(``limits``), the cross-process restore lock (``locks``) and the key scheme they all use
(``keys``). Without ``REDIS_URL`` the server uses in-process equivalents instead
(``downpour.paramstore.memory``, ``downpour.agents.limits.LocalLimits``, a thread lock).
"""
