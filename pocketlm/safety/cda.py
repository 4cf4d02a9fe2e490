"""Counterfactual data augmentation (CDA): two-sided swaps of gendered words and of religion and race
terms, from word lists written here, for `pocketlm debias`.

Each pair swaps both ways ("he" <-> "she", "church" <-> "mosque"), so the augmented corpus (every
passage and its counterfactual) holds each side equally often. Case is kept (He -> She, HIS -> HER).
The one ambiguous word is "her" (him or his): it becomes "his" when a word that is not a function
word follows ("her book" -> "his book"), else "him" ("told her." -> "told him."), the rule of the
original CDA papers' heuristics. First names are not swapped (a name list would be the next step).
Race terms include the colour words "black"/"white", so "a white horse" becomes "a black horse": a
known side effect of CDA that costs the language model little and is left in on purpose (without it
the race swap misses the most frequent terms).
"""

from __future__ import annotations

import re

GENDER = [
    ("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"), ("men", "women"),
    ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"),
    ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"),
    ("husbands", "wives"), ("king", "queen"), ("kings", "queens"), ("prince", "princess"),
    ("princes", "princesses"), ("uncle", "aunt"), ("uncles", "aunts"), ("nephew", "niece"), ("nephews", "nieces"),
    ("gentleman", "lady"), ("gentlemen", "ladies"), ("sir", "madam"), ("mr", "mrs"), ("male", "female"),
    ("males", "females"), ("masculine", "feminine"), ("grandfather", "grandmother"), ("grandson", "granddaughter"),
    ("boyfriend", "girlfriend"), ("groom", "bride"), ("widower", "widow"), ("actor", "actress"),
    ("waiter", "waitress"), ("hero", "heroine"), ("monk", "nun"), ("dad", "mom"), ("papa", "mama"), ("lad", "lass"),
    ("bachelor", "spinster"), ("stepfather", "stepmother"), ("godfather", "godmother"), ("emperor", "empress"),
    ("duke", "duchess"), ("landlord", "landlady"), ("headmaster", "headmistress"), ("businessman", "businesswoman"),
    ("chairman", "chairwoman"), ("policeman", "policewoman"), ("salesman", "saleswoman"),
    ("spokesman", "spokeswoman"), ("fiance", "fiancee"), ("manservant", "maidservant"),
]
# a minority faith paired with a majority one, disjoint pairs so every swap is two-sided
RELIGION = [
    ("christian", "muslim"), ("christians", "muslims"), ("christianity", "islam"), ("church", "mosque"),
    ("churches", "mosques"), ("bible", "quran"), ("priest", "imam"), ("priests", "imams"),
    ("jewish", "protestant"), ("jew", "gentile"), ("jews", "gentiles"), ("synagogue", "chapel"),
    ("rabbi", "pastor"), ("judaism", "protestantism"),
]
RACE = [
    ("black", "white"), ("blacks", "whites"), ("african", "european"), ("africans", "europeans"),
    ("negro", "caucasian"), ("negroes", "caucasians"),
]
LISTS = {"gender": GENDER, "religion": RELIGION, "race": RACE}
# occupations whose holders books tend to give one gender: passages naming one are where CDA can break the
# occupation-pronoun association (`debias --focus occupations` trains on those passages only)
OCCUPATIONS = frozenset("""doctor doctors physician physicians surgeon surgeons nurse nurses lawyer lawyers judge judges
attorney clerk clerks secretary secretaries teacher teachers professor professors schoolmaster schoolmistress governess
cook cooks baker bakers farmer farmers carpenter carpenters servant servants housekeeper housekeepers maid maids
manager managers sheriff guard guards driver drivers coachman tailor tailors dressmaker seamstress milliner cashier
librarian writer writers author authors editor editors banker bankers merchant merchants soldier soldiers sailor
sailors captain officer officers labourer labourers laborer mechanic mechanics attendant assistant accountant
designer hairdresser barber dancer singer painter artist artists engineer engineers chemist scientist minister
preacher shopkeeper grocer butcher blacksmith smith miner weaver washerwoman laundress cleaner porter messenger
postman mayor president governor senator chief boss employer master mistress student students pupil pupils
scholar poet novelist musician player officer clergyman""".split())

# after "her", these mean it is an object ("gave her the book" keeps "him": the next word is "the")
_FUNCTION = frozenset("""a an the and or but if of to in on at by for with from into onto upon as than that this
these those then so too very not no nor is was were be been are am do did does had has have will would shall should
can could may might must it its he she they them we us you i me my your our their there here what which who whom
when where why how all any some each every up down out off over under again once about after before""".split())
_WORD = re.compile(r"[A-Za-z]+")


def swap_table(lists=("gender", "religion", "race")) -> dict[str, str]:
    """word -> its counterpart, both ways; 'her' is resolved per occurrence (see swap)."""
    table: dict[str, str] = {}
    for name in lists:
        for a, b in LISTS[name]:
            table[a], table[b] = b, a
    table.pop("her", None)
    return table


def _cased(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def swap(text: str, table: dict[str, str] | None = None, her: bool = True) -> tuple[str, int]:
    """(the counterfactual text, how many words were swapped). her: also swap 'her' (gender on)."""
    table = swap_table() if table is None else table
    out, last, n = [], 0, 0
    matches = list(_WORD.finditer(text))
    for i, m in enumerate(matches):
        w = m.group()
        low = w.lower()
        if low == "her" and her:
            nxt = matches[i + 1].group().lower() if i + 1 < len(matches) else ""
            between = text[m.end():matches[i + 1].start()] if i + 1 < len(matches) else "."
            new = "his" if nxt and nxt not in _FUNCTION and between.strip() == "" else "him"
        elif low in table:
            new = table[low]
        else:
            continue
        out += [text[last:m.start()], _cased(new, w)]
        last, n = m.end(), n + 1
    out.append(text[last:])
    return "".join(out), n
