"""Game name search: normalisation of every script, and the index's answers against the plain definition."""

from __future__ import annotations

import random
import unicodedata

import pytest

from bannermatch.steam import NameIndex, _normalize_any, normalize_name, search_names


def reference_search(normalized: dict[str, tuple[str, str]], query: str) -> list[tuple[str, str]]:
    """The definition, spelled out, over ``{appid: (name, normalised name)}``: every name containing the query;
    exact, then prefix, then the rest; shorter, then smaller app id."""
    q = normalize_name(query)
    if not q:
        return []
    hits = sorted(((n != q, not n.startswith(q), len(n), int(appid), appid), appid, name)
                  for appid, (name, n) in normalized.items() if q in n)
    return [(appid, name) for _, appid, name in hits]


def test_symbols_vanish_and_every_script_survives():
    assert normalize_name("STAR WARS™ Battlefront™ II") == "star wars battlefront ii"
    assert normalize_name("Sid Meier’s Civilization® VI") == normalize_name("Sid Meiers Civilization VI")
    assert normalize_name("Titanfall\xad™") == "titanfall"  # soft hyphen, then ™
    assert normalize_name("SexyHub ❤️") == "sexyhub"  # the emoji's variation selector goes with it
    assert normalize_name("Crème Brûlée") == "creme brulee" and normalize_name("Straße") == "strasse"
    assert normalize_name("東方紅魔郷") == "東方紅魔郷"
    assert normalize_name("Ведьмак 2") == "ведьмак 2"
    assert normalize_name("Йога") == "йога"  # Cyrillic letters keep their marks: й is not и
    assert normalize_name("ｶﾞﾝﾀﾞﾑ") == normalize_name("ガンダム") == "ガンダム"  # half-width kana, voiced marks kept
    assert normalize_name("한국어") == "한국어"
    assert normalize_name("Witch of Ice Kingdom Ⅱ") == "witch of ice kingdom ii"
    assert normalize_name("Soulslayer～灭魂·误佳期～") == "soulslayer 灭魂 误佳期"
    assert normalize_name("™ 🐻 !?") == ""


def test_real_names_normalise_sensibly(steam_names):
    ascii_names = [name for name in steam_names.values() if name.isascii()]
    assert len(ascii_names) > 25_000
    assert all(normalize_name(name) == _normalize_any(name) for name in ascii_names)  # the fast path agrees
    for c in map(chr, range(128)):
        assert normalize_name(f"a{c}b") == _normalize_any(f"a{c}b"), repr(c)
    for name in steam_names.values():
        n = normalize_name(name)
        assert normalize_name(n) == n, name
        assert bool(n) == any(c.isalnum() for c in name), name  # empty only when there is no letter or digit
        if "™" in name or "®" in name:
            assert n == normalize_name(name.replace("™", "").replace("®", "")), name


def test_real_names_are_found_in_any_script(steam_names):
    assert search_names(steam_names, "Star Wars Battlefront II")[0] == ("1237950", "STAR WARS™ Battlefront™ II")
    assert search_names(steam_names, "call of duty 2")[0] == ("2630", "Call of Duty® 2")
    assert search_names(steam_names, "隐世神剑")[0] == ("659960", "隐世神剑传")
    assert ("338070", "ルナティックドーン レジェンドパック") in search_names(steam_names, "ﾚｼﾞｪﾝﾄﾞﾊﾟｯｸ")
    assert search_names(steam_names, "самозванец") == [("1123510", "Самозванец")]
    assert ("1174850", "Путь Пацана") in search_names(steam_names, "ПУТЬ")
    assert search_names(steam_names, "Ведьмак 2") == []  # not in the list: nothing, not every game with a "2"
    cjk = [name for name in steam_names.values() if any("CJK" in unicodedata.name(c, "") for c in name)]
    cyrillic = [name for name in steam_names.values() if any("CYRILLIC" in unicodedata.name(c, "") for c in name)]
    assert len(cjk) > 500 and len(cyrillic) > 20
    index = NameIndex(steam_names)
    for name in cjk[::25] + cyrillic:  # each finds itself by its own name
        assert name in [found for _, found in index.search(name, 50)], name


def test_names_that_normalise_to_nothing_match_nothing(steam_names):
    names = {**steam_names, "9000001": "™", "9000002": "🐻🐻", "9000003": ""}
    for query in ("a", "e", "1", "2", "star", "™", "🐻", " ", ""):
        found = [appid for appid, _ in search_names(names, query, limit=len(names))]
        assert not {"9000001", "9000002", "9000003"} & set(found), query
    assert search_names(names, "™") == search_names(names, "🐻") == search_names(names, "?!") == []


def test_index_answers_as_the_definition_on_real_names(steam_names):
    rng = random.Random(7)
    sample = rng.sample(sorted(steam_names.values()), 60)
    queries = ["a", "e", "s", "2", "the", "ii", "portal", "Portal 2", "PORTAL", "euro truck", "simulator", "™", "",
               "zzzzqx", "call of duty", "ガ", "的", "с"]
    for name in sample:
        n = normalize_name(name)
        queries += [name, name[: rng.randint(1, max(1, len(name)))], n[len(n) // 3: len(n) // 3 + 4]]
    index = NameIndex(steam_names)
    normalized = {appid: (name, normalize_name(name)) for appid, name in steam_names.items()}
    for query in queries:
        expected = reference_search(normalized, query)
        for limit in (1, 12, 200):
            assert index.search(query, limit) == expected[:limit], (query, limit)


def test_ties_and_limits():
    names = {"30": "Portal", "7": "PORTAL™", "400": "Portal 2", "5": "Super Portal", "6": "A Portal", "8": "portals"}
    assert search_names(names, "portal", 10) == [("7", "PORTAL™"), ("30", "Portal"), ("8", "portals"),
                                                 ("400", "Portal 2"), ("6", "A Portal"), ("5", "Super Portal")]
    assert search_names(names, "portal", 3) == search_names(names, "portal", 10)[:3]
    assert search_names(names, "portal", 0) == []
    assert search_names(names, "super") == [("5", "Super Portal")]


def test_a_changed_dict_is_searched_again():
    names = {"1": "Portal"}
    assert search_names(names, "celeste") == []
    names["2"] = "Celeste"
    assert search_names(names, "celeste") == [("2", "Celeste")]
    names["2"] = "Hollow Knight"
    assert search_names(names, "celeste") == [] and search_names(names, "knight") == [("2", "Hollow Knight")]
