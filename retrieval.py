"""
The retrieval task, written once: key-value episodes inside natural text (MQAR-style: Zoology, Arora et al. 2023),
trained from scratch by plain next-token prediction and scored by the distance between a key and its query.

    ... natural text [7kqz] more text [4abc] ... text {7kqz} text ...
                     ^ a pair: key 7, value kqz     ^ a query repeats key 7; its answer is the value

Pairs are `[` key value `]`, queries `{` key value `}`; keys are key_len digits, values value_len lowercase
letters (the markers and the digits do not occur in Tiny Shakespeare, so an episode cannot be confused with the
text; lowercase values are letters the text uses, so only a copy predicts them). In a training window the keys are
unique, each query comes after its pair, and the pairs, the queries and their distances are spread over the whole
window (`training_example`). An evaluation prompt (`prompt`) is a window of validation text with the target pair at
a chosen distance from a query at the very end, and distractor pairs (other keys) around it; the model's greedy
continuation of `{K` is its answer. The key comes right before its value, without a separator: to answer, a query's
last key character looks for the position that follows the same key in a pair and copies from there, one step of an
induction head (Olsson et al. 2022); a separator between them would make it two. The defaults (one-digit keys,
every window an episode of 1-4 pairs and 1-4 queries) are the recipe the demo model learns in its budget
(docs/results.md, "Retrieval past the training length").

data/retrieval_char/prepare.py builds the training mixture with `training_example`, train.py logs the answers' loss
and accuracy with `token_roles`, eval_retrieval.py builds its prompts with `prompt` and scores them with `score`.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch

PAIR = ("[", "]")         # open, close
QUERY = ("{", "}")
KEY_ALPHABET = "0123456789"
VALUE_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
CURRICULUM = 48000  # dataset retrieval_char_curriculum's near windows: the first 1,500 steps of batch 32 (its config)
NEAR_KINDS = ("adjacent", "span", "crossed")  # the curriculum's near episodes (training_example's near)


@dataclass(frozen=True)
class Task:
    """The task's settings, stored in the dataset's meta.pkl (meta['retrieval']) so that training and evaluation
    read them from the data the model was trained on."""
    key_len: int = 1
    value_len: int = 3
    max_pairs: int = 4        # pairs per episode window: 1 .. max_pairs
    max_queries: int = 4      # queries per episode window: 1 .. min(max_queries, pairs)
    share: float = 1.0        # the share of training windows that carry an episode (the others are plain text)

    @property
    def item_len(self):
        """Characters of one pair (or query): open, key, value, close."""
        return self.key_len + self.value_len + 2

    def as_meta(self):
        return asdict(self)


def task_of(meta):
    """The Task of a dataset's meta.pkl, or None for data without the task."""
    r = (meta or {}).get("retrieval")
    return Task(**{k: v for k, v in r.items() if k in Task.__dataclass_fields__}) if r else None


def alphabet(text):
    """The characters of a retrieval dataset: the text's, the markers and both alphabets, sorted (stable ids)."""
    return sorted(set(text) | set(PAIR) | set(QUERY) | set(KEY_ALPHABET) | set(VALUE_ALPHABET))


def _keys(rng, task, n, exclude=()):
    """n distinct keys (strings of key_len digits), none of them in exclude."""
    space = len(KEY_ALPHABET) ** task.key_len
    picks = rng.choice(space, size=n + len(exclude), replace=False)
    out = []
    for k in picks:
        s = "".join(KEY_ALPHABET[(int(k) // len(KEY_ALPHABET) ** i) % len(KEY_ALPHABET)] for i in range(task.key_len))
        if s not in exclude:
            out.append(s)
    return out[:n]


def _value(rng, task):
    return "".join(VALUE_ALPHABET[i] for i in rng.integers(0, len(VALUE_ALPHABET), task.value_len))


def pair_text(key, value):
    return f"{PAIR[0]}{key}{value}{PAIR[1]}"


def query_text(key, value=""):
    """A query; without a value, the prompt's end `{K` that the model continues."""
    return f"{QUERY[0]}{key}" + (f"{value}{QUERY[1]}" if value else "")


def training_example(filler, rng, task, length, max_distance=None, near="adjacent"):
    """One training window of `length` characters: with probability task.share an episode (1..max_pairs pairs of
    unique keys, 1..max_queries queries of some of those keys, each after its pair, all at random places in the
    filler), else filler alone. filler: a string of at least `length` characters (only its start is used).
    max_distance: a curriculum's near episodes, every query at most max_distance characters after its pair (key to
    key), in one of three kinds (near): "adjacent", every query right after its own pair (nothing between them but
    text), the text between them drawn as before and cut short; "span", the usual episode (pairs may lie between a
    query and its pair) confined to a span of max_distance + item_len characters at a random place in the window,
    with as many pairs as the span holds (at most max_pairs); "crossed", an episode in such a span (of at least
    3 items) whose every query has another pair between it and its own. An adjacent episode can be answered by
    copying the nearest pair, whatever its key; a span episode of two or more pairs cannot always; a crossed one
    never.
    Returns (text, [(key, pair start, query start), ...])."""
    if max_distance is not None and near not in NEAR_KINDS:
        raise ValueError(f"near is adjacent, span or crossed; got {near!r}")
    if max_distance is not None and max_distance < task.item_len:
        raise ValueError(f"max_distance={max_distance} is shorter than a pair ({task.item_len} characters)")
    if rng.random() >= task.share:
        return filler[:length], []
    if max_distance is not None and near in ("span", "crossed"):
        if near == "crossed":  # (at least two items from a pair to its query: a distance of 2 item_len)
            span = min(length, max(max_distance, 2 * task.item_len) + task.item_len)
            o = int(rng.integers(0, length - span + 1))
            episode, asked = _crossed_episode(filler[o:], rng, task, span)
        else:
            span = min(length, max_distance + task.item_len)
            cap = min(task.max_pairs, span // (2 * task.item_len))
            o = int(rng.integers(0, length - span + 1))
            sub = Task(**(task.as_meta() | {"max_pairs": cap, "max_queries": min(task.max_queries, cap), "share": 1.0}))
            episode, asked = training_example(filler[o:], rng, sub, span)
        items = sum(episode.count(c) for c in (PAIR[0], QUERY[0])) * task.item_len  # (the text has no markers)
        text = filler[:o] + episode + filler[o + span - items:length - items]
        assert len(text) == length, (len(text), length)
        return text, [(k, p + o, q + o) for k, p, q in asked]
    n_pairs = int(rng.integers(1, task.max_pairs + 1))
    n_queries = int(rng.integers(1, min(task.max_queries, n_pairs) + 1))
    room = length - task.item_len * (n_pairs + n_queries)
    if room < 0:
        raise ValueError(f"a window of {length} characters cannot hold {n_pairs} pairs and {n_queries} queries")
    keys = _keys(rng, task, n_pairs)
    values = [_value(rng, task) for _ in keys]
    asked = rng.choice(n_pairs, size=n_queries, replace=False)
    items = [("pair", i) for i in range(n_pairs)] + [("query", int(i)) for i in asked]
    if max_distance is None:
        order = list(rng.permutation(len(items)))  # a random order, then every query moved after its pair
        slot = {items[j]: s for s, j in enumerate(order)}
        for i in asked:
            p, q = slot[("pair", int(i))], slot[("query", int(i))]
            if q < p:
                slot[("pair", int(i))], slot[("query", int(i))] = q, p
        ordered = sorted(items, key=lambda it: slot[it])
        cuts = np.sort(rng.integers(0, room + 1, len(ordered)))  # where each item goes into the filler
    else:
        # adjacent: the pairs in a random order, each asked one's query right after it; each query's text gap after
        # its pair uniform in 0 .. max_distance - item_len (as far as the room allows), then the pairs at sorted
        # uniform places in the text that is left
        ordered = [it for i in rng.permutation(n_pairs) for it in
                   ([("pair", int(i))] + ([("query", int(i))] if i in asked else []))]
        gaps, left = [], room
        for kind, _ in ordered:
            g = int(rng.integers(0, min(max_distance - task.item_len, left) + 1)) if kind == "query" else 0
            gaps.append(g)
            left -= g
        base, k, cuts = np.sort(rng.integers(0, left + 1, n_pairs)), 0, []
        for (kind, _), g in zip(ordered, gaps, strict=True):
            if kind == "pair":
                cuts.append(int(base[k]) + sum(gaps[:len(cuts)]))
                k += 1
            else:
                cuts.append(cuts[-1] + g)
    return _lay_out(filler, task, length, ordered, cuts, keys, values, asked)


def _lay_out(filler, task, length, ordered, cuts, keys, values, asked):
    """The window: the items (kind, pair index) in order, item j inserted after cuts[j] characters of the filler.
    Returns (text, [(key, pair start, query start) of each asked pair])."""
    room = length - task.item_len * len(ordered)
    out, pos, starts, last = [], 0, {}, 0
    for (kind, i), c in zip(ordered, cuts, strict=True):
        out.append(filler[last:c])
        pos += c - last
        last = c
        starts[(kind, i)] = pos
        out.append(pair_text(keys[i], values[i]) if kind == "pair" else query_text(keys[i], values[i]))
        pos += task.item_len
    out.append(filler[last:room])
    text = "".join(out)
    assert len(text) == length, (len(text), length)
    return text, [(keys[int(i)], starts[("pair", int(i))], starts[("query", int(i))]) for i in asked]


def _crossed_episode(filler, rng, task, length):
    """An episode of `length` characters in which every query has another pair between it and its own: 2 or more
    pairs, then queries of pairs other than the last, at random places in the filler (the nearest pair before a
    query is never its own)."""
    fit = length // task.item_len  # items that fit
    if task.max_pairs < 2 or fit < 3:
        raise ValueError(f"a crossed episode needs max_pairs >= 2 and {3 * task.item_len} characters")
    n_pairs = int(rng.integers(2, min(task.max_pairs, fit - 1) + 1))
    n_queries = int(rng.integers(1, min(task.max_queries, n_pairs - 1, fit - n_pairs) + 1))
    keys = _keys(rng, task, n_pairs)
    values = [_value(rng, task) for _ in keys]
    asked = rng.choice(n_pairs - 1, size=n_queries, replace=False)
    ordered = [("pair", i) for i in range(n_pairs)] + [("query", int(i)) for i in asked]
    cuts = np.sort(rng.integers(0, length - task.item_len * len(ordered) + 1, len(ordered)))
    return _lay_out(filler, task, length, ordered, cuts, keys, values, asked)


def prompt(filler, rng, task, length, distance, n_distractors):
    """An evaluation prompt of `length` characters, answer included: filler text with the target pair's key
    `distance` characters before the query's key, n_distractors pairs of other keys at random places, and the
    query `{K` at the end, followed by the answer (value_len characters). filler: at least `length` characters of
    text. Returns (prompt without the answer, answer, target key)."""
    body = length - task.value_len  # what the model reads: it ends with `{K`
    q_key = body - task.key_len  # the query's key starts here
    p_start = q_key - distance - 1   # the target pair's `[`
    if p_start < 0 or distance < task.item_len:
        raise ValueError(f"distance {distance} does not fit a prompt of {length} characters (it needs "
                         f"{task.item_len} <= distance <= {q_key - 1})")
    key, *others = _keys(rng, task, 1 + n_distractors)
    value = _value(rng, task)
    # the target pair and the distractors at non-overlapping places in [0, body - len('{K')): the distractors'
    # starts drawn uniformly among the free ones
    end = body - (task.key_len + 1)
    taken = np.zeros(end + 1, dtype=bool)  # taken[s]: an item starting at s would overlap one placed
    taken[max(0, p_start - task.item_len + 1):p_start + task.item_len] = True
    taken[end - task.item_len + 1:] = True
    places = []
    for _ in others:
        free = np.flatnonzero(~taken)
        if not len(free):
            break
        s = int(rng.choice(free))
        places.append(s)
        taken[max(0, s - task.item_len + 1):s + task.item_len] = True
    items = sorted([(p_start, pair_text(key, value))] + [(s, pair_text(k, _value(rng, task)))
                                                          for s, k in zip(places, others, strict=False)])
    out, pos, used = [], 0, 0  # text between the items comes from the filler, in order
    for s, text in items:
        out.append(filler[used:used + s - pos])
        used += s - pos
        out.append(text)
        pos = s + task.item_len
    out.append(filler[used:used + end - pos])
    out.append(query_text(key))
    text = "".join(out)
    assert len(text) == body and text[p_start:p_start + task.item_len] == pair_text(key, value), (len(text), body)
    return text, value, key


def token_roles(x, y, stoi, key_len):
    """Which targets of a batch are what, from the token ids alone: x, y (B, T) inputs and next-token targets.
    Returns (answer, query, text): answer (B, T) bool, the targets that are a query's value characters (the
    answer the model must retrieve: the characters after the query's key_len key characters); query (B, T) long,
    the position of that query's `{` (to group a query's characters); text (B, T) bool, the targets outside every
    pair and query (the language-model part)."""
    B, T = x.shape
    z = torch.cat([x[:, :1], y], dim=1)  # the whole window, positions 0 .. T
    idx = torch.arange(T + 1, device=x.device).expand(B, -1)
    none = torch.full_like(idx, -1)

    def last(mask):  # the position of the latest True at or before each position, -1 before the first
        return torch.cummax(torch.where(mask, idx, none), dim=1).values

    q_open, q_close = last(z == stoi[QUERY[0]]), last(z == stoi[QUERY[1]])
    opens = last((z == stoi[QUERY[0]]) | (z == stoi[PAIR[0]]))
    closes = last((z == stoi[QUERY[1]]) | (z == stoi[PAIR[1]]))
    inside = opens > torch.cat([none[:, :1], closes[:, :-1]], dim=1)  # from an open marker to its close, both included
    # target t (token t + 1) is an answer character when token t lies in an open query at its last key character or
    # after it, and token t + 1 is not the query's close
    in_answer = (q_open > q_close) & (idx - q_open >= key_len)
    answer = in_answer[:, :-1] & (z[:, 1:] != stoi[QUERY[1]])
    return answer, q_open[:, :-1], ~inside[:, 1:]


@torch.no_grad()
def answer_stats(logits, x, y, stoi, key_len):
    """Sums over a batch for the training log: (answer tokens, their summed loss, correct argmax ones, queries,
    queries with every answer character right, text tokens, their summed loss)."""
    answer, query, text = token_roles(x, y, stoi, key_len)
    loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
    right = logits.argmax(-1) == y
    n_ans = int(answer.sum())
    stats = [n_ans, float(loss[answer].sum()), int((right & answer).sum())]
    if n_ans:  # a query is right when all of its answer characters are: group them by (row, query position)
        key = (torch.arange(x.shape[0], device=x.device).view(-1, 1) * (x.shape[1] + 1) + query)[answer]
        groups, inv = torch.unique(key, return_inverse=True)
        all_right = torch.ones(len(groups), dtype=torch.long, device=x.device).scatter_reduce(
            0, inv, right[answer].long(), reduce="amin")
        stats += [len(groups), int(all_right.sum())]
    else:
        stats += [0, 0]
    return stats + [int(text.sum()), float(loss[text].sum())]


def score(answers, truths):
    """(exact, characters right, characters): exact-match and per-character counts of decoded answers against
    the true values, both lists of equal-length strings (or id lists)."""
    exact = sum(a == t for a, t in zip(answers, truths, strict=True))
    chars = sum(ca == ct for a, t in zip(answers, truths, strict=True) for ca, ct in zip(a, t, strict=True))
    return exact, chars, sum(len(t) for t in truths)
