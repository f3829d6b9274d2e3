"""The group stage of ``duplicates``: the pairs the cell tasks found and the rows with
equal content digests, joined into groups without chaining dissimilar images.

Exact copies (one digest) are one image to the grouping: it runs on one representative
of each (the best-ranked), and the copies follow it. Near groups are then made greedily,
best-ranked image first (largest width x height where known, then the first in ordinal
order): an image not yet in a group, with neighbours (pairs >= threshold) not yet in a
group, keeps a group of itself and those neighbours. Every member is so within the
threshold of its group's kept member, whatever chains the pair graph holds (A~B, B~C,
A not~C gives {A, B} and leaves C out, or {C} with another neighbour).

Memory holds the pairs, the exact duplicates and the facts (path, area, label) of the
images in either: it grows with the duplicates, not with the rows. DuckDB deduplicates
the pairs (a pair compared in two cells is in two files), finds equal digests and joins
the facts, spilling to the work dir where it must.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

OUTPUT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("group", pa.int64()),
    ("keep", pa.bool_()),
    ("similarity", pa.float32()),  # cosine to the group's kept member (1.0: it, or its exact copy)
    ("kind", pa.string()),  # 'exact': the kept member's bytes; 'near': a near-duplicate of it
    ("given_label", pa.string()),
])


def _connect(work: str):
    import duckdb

    con = duckdb.connect()
    con.execute("SET memory_limit = '1GB'")
    con.execute(f"SET temp_directory = '{os.path.join(work, 'duckdb')}'")
    return con


def group_stage(work: str, threshold: float, near: bool) -> tuple[pa.Table, dict]:
    """The output table (``OUTPUT_SCHEMA``, one row per image that has a duplicate, by
    group, kept member first) and its summary, from ``work``'s rows/ and pairs/ files."""
    con = _connect(work)
    rows = f"read_parquet('{os.path.join(work, 'rows', '*.parquet')}')"
    exact = con.sql(f"""
        SELECT ordinal, digest FROM {rows}
        WHERE digest IN (SELECT digest FROM {rows} WHERE digest IS NOT NULL GROUP BY digest HAVING count(*) > 1)
        ORDER BY digest, ordinal""").to_arrow_table()
    if near:
        pairs = con.sql(f"""
            SELECT a, b, max(similarity) AS similarity
            FROM read_parquet('{os.path.join(work, 'pairs', '*.parquet')}')
            WHERE similarity >= {float(threshold)} GROUP BY a, b ORDER BY a, b""").to_arrow_table()
    else:
        pairs = pa.table({"a": pa.array([], pa.int64()), "b": pa.array([], pa.int64()),
                          "similarity": pa.array([], pa.float32())})
    involved = np.unique(np.concatenate([exact.column("ordinal").to_numpy(), pairs.column("a").to_numpy(),
                                         pairs.column("b").to_numpy()]))
    con.register("involved", pa.table({"ordinal": involved}))
    facts = con.sql(f"SELECT r.ordinal, r.path, r.area, r.given_label FROM {rows} r "
                    "JOIN involved USING (ordinal) ORDER BY r.ordinal").to_arrow_table()
    con.close()
    groups = _groups(involved, facts, exact, pairs)
    table = _output(groups, facts)
    summary = {"groups": len(groups), "images_in_groups": table.num_rows,
               "images_dropped": table.num_rows - len(groups),  # all but each group's kept member
               "exact_groups": sum(all(kind == "exact" for _, _, kind in group) for group in groups),
               "pairs": pairs.num_rows, "threshold": threshold}
    return table, summary


def _groups(involved: np.ndarray, facts: pa.Table, exact: pa.Table, pairs: pa.Table) -> list[list[tuple]]:
    """Groups as lists of (ordinal, similarity to the kept member, kind), kept member
    first, the groups in the order of their kept member's ordinal."""
    area = facts.column("area").fill_null(-1).to_numpy()
    # rank[i]: the position of involved[i] in the keep order (largest area, then first ordinal)
    order = np.lexsort((involved, -area))
    rank = np.empty(len(involved), dtype=np.int64)
    rank[order] = np.arange(len(involved))

    # exact copies: each ordinal -> its digest's best-ranked ordinal (index into involved)
    representative = np.arange(len(involved))
    copies: dict[int, list[int]] = {}
    digests = exact.column("digest").to_pylist()
    members = np.searchsorted(involved, exact.column("ordinal").to_numpy())
    start = 0
    for end in range(1, len(digests) + 1):
        if end == len(digests) or digests[end] != digests[start]:
            same = members[start:end]
            best = same[np.argmin(rank[same])]
            representative[same] = best
            copies[int(best)] = [int(i) for i in same if i != best]
            start = end

    # near pairs between representatives, as a CSR adjacency (both directions)
    a = representative[np.searchsorted(involved, pairs.column("a").to_numpy())]
    b = representative[np.searchsorted(involved, pairs.column("b").to_numpy())]
    similarity = pairs.column("similarity").to_numpy()
    distinct = a != b
    source, target = np.concatenate([a[distinct], b[distinct]]), np.concatenate([b[distinct], a[distinct]])
    both = np.concatenate([similarity[distinct], similarity[distinct]])
    by_source = np.lexsort((target, source))
    source, target, both = source[by_source], target[by_source], both[by_source]
    starts = np.searchsorted(source, np.arange(len(involved) + 1))

    grouped = np.zeros(len(involved), dtype=bool)
    groups = []
    for node in order:  # best-ranked first
        if grouped[node] or representative[node] != node:
            continue
        neighbours, scores = target[starts[node]:starts[node + 1]], both[starts[node]:starts[node + 1]]
        free = ~grouped[neighbours]
        # a neighbour met twice (two pairs of one exact class) keeps its best score
        taken = {}
        for neighbour, score in zip(neighbours[free].tolist(), scores[free].tolist()):
            taken[neighbour] = max(score, taken.get(neighbour, score))
        if not taken and not copies.get(node):
            continue
        grouped[node] = True
        grouped[list(taken)] = True
        kind = "exact" if not taken else "near"
        group = [(node, 1.0, kind)] + [(copy, 1.0, "exact") for copy in copies.get(node, [])]
        for neighbour, score in taken.items():
            group += [(neighbour, score, "near")] + [(copy, score, "near") for copy in copies.get(neighbour, [])]
        groups.append(group)
    groups.sort(key=lambda group: involved[group[0][0]])
    return [[(int(involved[i]), score, kind) for i, score, kind in
             [group[0], *sorted(group[1:], key=lambda member: involved[member[0]])]] for group in groups]


def _output(groups: list[list[tuple]], facts: pa.Table) -> pa.Table:
    ordinals = facts.column("ordinal").to_numpy()
    members = [(number, position, member) for number, group in enumerate(groups)
               for position, member in enumerate(group)]
    at = np.searchsorted(ordinals, np.array([member[0] for _, _, member in members], dtype=np.int64))
    return pa.table({
        "path": facts.column("path").take(at),
        "group": pa.array([number for number, _, _ in members], pa.int64()),
        "keep": pa.array([position == 0 for _, position, _ in members]),
        "similarity": pa.array([member[1] for _, _, member in members], pa.float32()),
        "kind": pa.array([member[2] for _, _, member in members], pa.string()),
        "given_label": facts.column("given_label").take(at),
    }, schema=OUTPUT_SCHEMA)
