"""Folder names made from user input (feature class names, goals, edit values): safe and unambiguous.

`safe_name` keeps lower-case letters, digits, `_` and `-` and writes every other byte of the UTF-8 text as `%xx`
(lower-case hex), `%` included. So a name never holds a path separator, never starts with a dot (no `..`, no hidden
folder), has no upper-case letters (distinct on case-insensitive file systems too), and distinct inputs give
distinct names (the encoding can be undone). `goal_folder` puts each kind of goal in its own prefix, so a class
called `weaken-female` and the goal `-female` (weaken female) land in different folders; an edit given by its values
gets `custom-ff<f>-lr<lr>`.

Goals are spelled `balance`, `<class>` (strengthen it) and `-<class>` (weaken it): that is the canonical spelling,
the one results and job.yaml hold. `strengthen:<class>` and `weaken:<class>` are accepted wherever a goal is given
(`--goal`, `evaluation.goals`, `rewrite`), because a value that starts with `-` reads as an option on a command line;
`canonical_goal` turns them into the canonical spelling. No class may start with those prefixes (or with `-`), so
every spelling names exactly one goal.
"""

from __future__ import annotations

SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
GOAL_PREFIXES = {"strengthen:": "", "weaken:": "-"}  # alias prefix -> canonical prefix
MAX_NAME = 100  # characters of a folder name made here (file systems allow 255 bytes)


def safe_name(text: str) -> str:
    """`text` as one folder name: [a-z0-9_-] kept, every other UTF-8 byte written as %xx."""
    return "".join(
        char if char in SAFE else "".join(f"%{byte:02x}" for byte in char.encode("utf-8")) for char in text
    )


def goal_folder(goal: str) -> str:
    """models/<this> of an edit chosen for a goal: balance, strengthen-<class>, weaken-<class> (goal -<class>)."""
    if goal == "balance":
        return "balance"
    if goal.startswith("-"):
        return "weaken-" + safe_name(goal[1:])
    return "strengthen-" + safe_name(goal)


def canonical_goal(goal: str) -> str:
    """The canonical spelling of a goal: `weaken:<class>` -> `-<class>`, `strengthen:<class>` -> `<class>`; any other
    text is returned as it is (whether it names a goal of the job is checked where the classes are known)."""
    for alias, prefix in GOAL_PREFIXES.items():
        if isinstance(goal, str) and goal.startswith(alias):
            return prefix + goal[len(alias):]
    return goal


def custom_folder(feature_factor: float, learning_rate: float) -> str:
    """models/<this> of an edit given by its values, e.g. custom-ff-0p5-lr0p01 (feature factor -0.5, learning rate
    0.01): the numbers as %g with the dot written p (%g never writes a p, so the name is unambiguous)."""
    return f"custom-ff{feature_factor:g}-lr{learning_rate:g}".replace(".", "p")


def class_name_problems(classes: list[str]) -> list[str]:
    """Why these feature classes cannot name goals and folders (empty: they can)."""
    problems = []
    for name in classes:
        if not isinstance(name, str):
            continue  # GradiendConfig refuses it with its own message
        if name == "balance":
            problems.append("gradiend.feature_classes: a class may not be called 'balance', the name of the goal that "
                            "balances the two classes; rename it.")
        if name.startswith("-"):
            problems.append(f"gradiend.feature_classes: {name!r} starts with '-', which marks the goal that weakens a "
                            "class (-<class>); rename it.")
        if name.startswith(tuple(GOAL_PREFIXES)):
            problems.append(f"gradiend.feature_classes: {name!r} starts with {name.split(':')[0] + ':'!r}, which "
                            "spells a goal (strengthen:<class>, weaken:<class>); rename it.")
        if len(goal_folder(name)) > MAX_NAME:
            problems.append(f"gradiend.feature_classes: {name[:40]!r}... is too long to name a folder; use a name "
                            f"of at most {MAX_NAME // 3} characters.")
    return problems
