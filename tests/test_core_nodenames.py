"""core.nodenames: the one decision of how a node is named on screen."""

from __future__ import annotations

from devmesh.core import nodenames

A, B, C = "aa11bb22" + "0" * 24, "cc33dd44" + "0" * 24, "ee55ff66" + "0" * 24


def test_a_name_nobody_shares_stays_as_it_is() -> None:
    assert nodenames.display_names([(A, "ana"), (B, "ben")]) == {A: "ana", B: "ben"}
    assert nodenames.shared([(A, "ana"), (B, "ben")]) == frozenset()


def test_every_live_node_of_a_shared_name_gets_its_id6() -> None:
    names = nodenames.display_names([(A, "ubuntu"), (B, "ubuntu"), (C, "ben")])
    assert names == {A: "ubuntu#aa11bb", B: "ubuntu#cc33dd", C: "ben"}
    assert nodenames.shared([(A, "ubuntu"), (B, "ubuntu")]) == {"ubuntu"}


def test_only_live_nodes_make_a_name_shared_but_others_follow_it() -> None:
    # An expired peer alone does not make a name shared ...
    assert nodenames.display_names([(A, "ubuntu")], [(B, "ubuntu")]) == {
        A: "ubuntu",
        B: "ubuntu",
    }
    # ... but while two live ones share it, an expired one of that name is labelled too.
    got = nodenames.display_names([(A, "ubuntu"), (C, "ubuntu")], [(B, "ubuntu")])
    assert got[B] == "ubuntu#cc33dd"


def test_one_node_seen_twice_is_not_a_clash() -> None:
    assert nodenames.display_names([(A, "ana"), (A, "ana")]) == {A: "ana"}


def test_shown_falls_back_to_the_name() -> None:
    assert nodenames.shown({A: "x#aa11bb"}, A, "x") == "x#aa11bb"
    assert nodenames.shown({}, B, "y") == "y"
    assert nodenames.shown({A: "z"}, None, "y") == "y"
