"""llama.cpp, and nothing of ISARA: the toolchain, the managed server, the client, GGUF tools.

This package never imports `loop`. Submodules are imported explicitly
(`server.process`, `server.client`, `server.gguf`, `server.toolchain`) so that
`python -m server.toolchain` runs on a bare Python before setup.
"""
