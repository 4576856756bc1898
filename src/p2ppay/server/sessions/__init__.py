"""One connection's session, from its first byte to its close: :mod:`.base` is what every
session is; :mod:`.native` and :mod:`.course` are the two dialects."""
