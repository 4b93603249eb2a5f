"""The one error type of planning: bad input, said in one line that names the input."""


class PlanInputError(ValueError):
    """Bad input to a plan (model, batch function, GPU, precision, LR, ...): one line naming the
    input and what was expected; the CLI prints it without a traceback. `input`: the
    parameter the line starts with, where the CLI says it as its own option (said_as)."""

    def __init__(self, message: str, input: str | None = None):
        super().__init__(message)
        self.input = input

    def said_as(self, option: str) -> str:
        """The line with its parameter said as the option the user typed (precisions ->
        --precision)."""
        line = str(self)
        if self.input and line.startswith(self.input):
            return option + line[len(self.input):]
        return line


def comma_list(text: str, input: str, what: str) -> list[str]:
    """'none, every' -> ['none', 'every'], the one reading of a list given as one string
    (the command line's options and the Python API's parameters alike); [] for no name at
    all ('', ','), which the caller says in its own words; an empty item among names
    ('none,,every', 'none,': an unset shell variable, a typo) is the one line naming
    `input` and `what` the list holds: it was dropped without a word."""
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        return []
    if not all(items):
        raise PlanInputError(f"{input}: empty item in {text!r}; expected a comma-separated "
                             f"list of {what}", input)
    return items


def names(value, input: str, examples: tuple[str, str]) -> list[str]:
    """A list of names as given (a string is split on commas as the command line splits
    it: 'fp32,fp16' is two names, 'fp16' one, not its characters), or the one line naming
    `input`: a value that is no list of them, an empty one (which would plan nothing), or
    an empty item in a string."""
    if isinstance(value, str):
        out = comma_list(value, input, f"names such as {','.join(examples)}")
        if not out:
            raise PlanInputError(f"{input}: expected at least one name such as "
                                 f"{examples[0]!r} or {examples[1]!r}, got {value!r}", input)
        return out
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise PlanInputError(f"{input}: expected a list of names such as {list(examples)}, "
                             f"got {type(value).__name__} {value!r}")
    out = list(value)
    if not out:
        raise PlanInputError(f"{input}: expected at least one name such as {examples[0]!r} "
                             f"or {examples[1]!r}, got an empty {type(value).__name__}")
    return out
