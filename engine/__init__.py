"""detnet.engine: the asyncio probe engine on uvloop.

Targets and scheduling, UDP/TCP probers driving the native core, sequence tracking,
numpy ring-buffer statistics, the reflector's asyncio side and the Prometheus collector.
Imports ``detnet.native`` and nothing else of detnet's.
"""
