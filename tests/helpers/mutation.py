"""Random byte edits for the property tests (hypothesis draws every choice)."""

from hypothesis import strategies as st


def mutate(data, raw, *, edits=8, cut=16, insert=8):
    """``raw`` with 1 to ``edits`` random edits: a flipped byte, a cut of up to ``cut``
    bytes, or up to ``insert`` inserted bytes."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, edits))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i:i + data.draw(st.integers(1, cut))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=insert))
    return bytes(raw)
