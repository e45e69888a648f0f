"""The desktop side of the agent: settings, idle detection, the CPU governor, resource
checks, the local status page and the login service.

Nothing here imports TensorFlow at module import; :mod:`.gpu` does inside its functions.
"""
