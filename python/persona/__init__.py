"""persona: persona vectors from Python — extract, monitor and steer character traits of chat models.

The engine is persona's Rust library (the same as the ``persona`` CLI and ``persona serve``), so a
steering request gives the same tokens and projections from Python, the CLI and HTTP.

    >>> import persona
    >>> m = persona.Model.load()                      # the default model, fetched on first use
    >>> g = m.generate("What would you do with power?", max_tokens=32,
    ...                steer=[{"vector": "evil", "coeff": 4}], monitor=["evil"])
    >>> g.text, g.projections["evil"]                 # float32 [tokens, layers]
"""

from ._persona import VERSION, Generation, Model, PersonaError, Token, TokenStream, Vector, set_cpu_activations

__version__ = VERSION
__all__ = ["Model", "Vector", "Generation", "Token", "TokenStream", "PersonaError", "VERSION", "set_cpu_activations"]
