"""One-line descriptions of exceptions, for the `error:` lines and messages that name a file."""


def one_line(error: BaseException, limit: int = 300) -> str:
  """"Type: first line of the message", at most ~`limit` characters of it: its start and its end, where
  TensorStore and ArrayRecord put the operating system's reason ("No space left on device")."""
  text = str(error).strip()
  if not text:
    return type(error).__name__
  line = text.splitlines()[0]
  if len(line) > limit:
    line = line[:limit // 2 - 10] + " ... " + line[-(limit // 2 + 10):]
  return f"{type(error).__name__}: {line}"
