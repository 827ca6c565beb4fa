"""CITATION.cff: the fields CFF 1.2.0 requires, the paper as the preferred citation, this repository as the software.

The full schema check is ``cffconvert --validate`` (it passed for this file); cffconvert is not an extra of
the project because it pins ``jsonschema<4``, which the Jupyter packages of the ``notebooks`` extra cannot use.
So this test checks with PyYAML what the schema requires and what a typo would break: the keys CFF 1.2.0
knows, the required ones, and the paper's authors, title and year.
"""
from __future__ import annotations

import tomllib

import yaml

from mdeq.engine import paths

CFF = paths.ROOT / "CITATION.cff"
# CFF 1.2.0: every top-level key, the required ones, and the keys of a reference (preferred-citation is one).
KEYS = {"abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi", "identifiers",
        "keywords", "license", "license-url", "message", "preferred-citation", "references", "repository",
        "repository-artifact", "repository-code", "title", "type", "url", "version"}
REQUIRED = {"cff-version", "message", "title", "authors"}
REFERENCE_REQUIRED = {"type", "title", "authors"}


def _cff() -> dict:
    return yaml.safe_load(CFF.read_text())


def _is_person_or_entity(author: dict) -> bool:
    return isinstance(author, dict) and bool(author.get("family-names") or author.get("name"))


def test_the_required_fields_and_only_known_keys():
    cff = _cff()
    assert REQUIRED <= set(cff), REQUIRED - set(cff)
    assert set(cff) <= KEYS, f"not CFF 1.2.0 keys: {sorted(set(cff) - KEYS)}"
    assert cff["cff-version"] == "1.2.0"
    assert cff["type"] == "software"
    assert cff["authors"] and all(_is_person_or_entity(a) for a in cff["authors"])
    version = tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert str(cff["version"]) == version, "CITATION.cff's version is pyproject.toml's"
    for ref in cff.get("references", []):
        assert REFERENCE_REQUIRED <= set(ref) and all(_is_person_or_entity(a) for a in ref["authors"])


def test_the_preferred_citation_is_the_paper():
    paper = _cff()["preferred-citation"]
    assert REFERENCE_REQUIRED <= set(paper)
    assert paper["type"] == "conference-paper"
    assert paper["title"] == "Multiscale Deep Equilibrium Models"
    assert [(a["given-names"], a["family-names"]) for a in paper["authors"]] == [
        ("Shaojie", "Bai"), ("Vladlen", "Koltun"), ("J. Zico", "Kolter")]
    assert paper["year"] == 2020 and "NeurIPS 2020" in paper["collection-title"]
