"""Pickle gadgets for hostile-input tests: objects whose unpickling would call a function of the attacker's choice."""


class Call:
    """Pickles as `function(*args)`: an unrestricted unpickler calls it, a safe reader must refuse it by name."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args
