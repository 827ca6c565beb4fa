"""The library: what a multiscale deep equilibrium model is and how its equilibrium is found.

Solvers, the implicit layer with its implicit backward pass, the stability estimates, the model, its
configs and the converter of released checkpoints. Imports torch and nothing of ``mdeq.engine`` or
``mdeq.paper``; the public names are re-exported by ``mdeq`` itself.
"""
