"""The one error type of planning: bad input, said in one line that names the input."""


class PlanInputError(ValueError):
    """Bad input to a plan (model, batch function, GPU, precision, LR, ...): one line naming the
    input and what was expected; the CLI prints it without a traceback."""
