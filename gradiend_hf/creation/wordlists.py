"""Built-in feature classes: the rules behind the recipes, kept apart so users can read, copy and extend them.

English attributes follow `en_core_web_sm` (Penn tags + UD morphology: "her" is PRP$ / Poss=Yes as a possessive and
PRP / Case=Acc as an object). German attributes follow `de_core_news_sm` (UD morphology of TIGER: articles carry
PronType=Art with Gender, Case and Number).
"""

from __future__ import annotations

from .filters import FeatureClass, TokenRule

R = TokenRule.of


def gender_pronoun_classes() -> list[FeatureClass]:
    """female vs male 3rd-person pronouns; "her" and "his" are split by spaCy tag/morphology."""
    female = FeatureClass("female", [
        R("she", pos="PRON", to="he", form="subject"),
        R("her", pos="PRON", morph="Poss=Yes", to="his", form="possessive"),
        R("her", pos="PRON", tag="PRP$", to="his", form="possessive"),
        R("her", pos="PRON", morph="Case=Acc", to="him", form="object"),
        R("hers", to="his", form="possessive_pronoun"),
        R("herself", to="himself", form="reflexive"),
    ])
    male = FeatureClass("male", [
        R("he", pos="PRON", to="she", form="subject"),
        R("him", pos="PRON", to="her", form="object"),
        R("his", tag="PRP", to="hers", form="possessive_pronoun"),  # standalone: "the book is his"
        R("his", to="her", form="possessive"),
        R("himself", to="herself", form="reflexive"),
    ])
    return [female, male]


GENDER_FORMS = {  # pronoun per form and class: what a name template's [MASK] becomes
    "subject": {"female": "she", "male": "he"},
    "object": {"female": "her", "male": "him"},
    "possessive": {"female": "her", "male": "his"},
    "possessive_pronoun": {"female": "hers", "male": "his"},
    "reflexive": {"female": "herself", "male": "himself"},
}

GENDERED_WORDS = (  # gender cues besides pronouns: kept out of neutral text and of name templates
    "man men woman women boy boys girl girls male males female females mother mothers father fathers son sons "
    "daughter daughters brother brothers sister sisters wife wives husband husbands king kings queen queens "
    "prince princes princess princesses lord lady ladies gentleman gentlemen mr mrs ms miss sir madam actress "
    "actresses actor widow widower uncle aunt nephew niece grandmother grandfather grandson granddaughter "
    "boyfriend girlfriend bride groom emperor empress duke duchess monk nun"
).split()


def pronoun_number_classes(include_it: bool = True) -> list[FeatureClass]:
    """singular (he/she/it) vs plural (they) in all case forms; "it" is split by dependency (subject vs object)."""
    singular = [
        R(["he", "she"], pos="PRON", morph="Number=Sing", to="they", form="subject"),
        R("him", pos="PRON", to="them", form="object"),
        R("her", pos="PRON", morph="Case=Acc", to="them", form="object"),
        R("her", pos="PRON", morph="Poss=Yes", to="their", form="possessive"),
        R("his", tag="PRP", to="theirs", form="possessive_pronoun"),
        R(["his", "its"], to="their", form="possessive"),
        R("hers", to="theirs", form="possessive_pronoun"),
        R(["himself", "herself", "itself"], to="themselves", form="reflexive"),
    ]
    if include_it:  # en_core_web_sm gives "it" no Case: the parser's dependency label tells subject from object
        singular += [
            R("it", pos="PRON", dep=["nsubj", "nsubjpass", "expl", "csubj"], to="they", form="subject"),
            R("it", pos="PRON", dep=["dobj", "pobj", "dative", "iobj", "obj"], to="them", form="object"),
        ]
    plural = [
        R("they", pos="PRON", morph="Number=Plur", to=["he", "she"] + (["it"] if include_it else []), form="subject"),
        R("them", pos="PRON", morph="Number=Plur", to=["him", "her"] + (["it"] if include_it else []), form="object"),
        R("their", to=["his", "her", "its"], form="possessive"),
        R("theirs", to=["his", "hers"], form="possessive_pronoun"),
        R("themselves", to=["himself", "herself", "itself"], form="reflexive"),
    ]
    return [FeatureClass("singular", singular), FeatureClass("plural", plural)]


PERSON_NOUNS = (
    "people person persons man men woman women boy boys girl girls child children family families community "
    "communities population populations resident residents voter voters student students worker workers american "
    "americans citizen citizens majority minority neighborhood neighborhoods slave slaves player players farmer "
    "farmers immigrant immigrants settler settlers victim victims officer officers soldier soldiers audience "
    "audiences leader leaders activist activists nationalist nationalists supremacist supremacists"
).split()

# Aligned lists: entry i of one class maps to entry i of the other (pairs, or triples for three classes).
RELIGION_CLASSES = ("christian", "jewish", "muslim")  # the religion recipe's default classes
RACE_CLASSES = ("asian", "black", "white")  # the race recipe's default classes
RELIGION_WORDS = {
    "christian": ["christian", "christians", "christianity", "church", "churches", "bible", "priest", "priests"],
    "muslim": ["muslim", "muslims", "islam", "mosque", "mosques", "quran", "imam", "imams"],
    "jewish": ["jewish", "jews", "judaism", "synagogue", "synagogues", "torah", "rabbi", "rabbis"],
}
RACE_WORDS = {  # colours and continents are more often not about people: as adjectives they count before a person noun
    "white": [R("white", followed_by=PERSON_NOUNS), R("whites"), R("caucasian", followed_by=PERSON_NOUNS),
              R("caucasians")],
    "black": [R("black", followed_by=PERSON_NOUNS), R("blacks"), R("african", followed_by=PERSON_NOUNS),
              R("africans")],
    "asian": [R("asian", followed_by=PERSON_NOUNS), R("asians"), R("asian", followed_by=PERSON_NOUNS), R("asians")],
}

GERMAN_DEFINITE_ARTICLES = {  # (Gender, Case) -> article, singular; plural under Gender None
    ("Masc", "Nom"): "der", ("Masc", "Acc"): "den", ("Masc", "Dat"): "dem", ("Masc", "Gen"): "des",
    ("Fem", "Nom"): "die", ("Fem", "Acc"): "die", ("Fem", "Dat"): "der", ("Fem", "Gen"): "der",
    ("Neut", "Nom"): "das", ("Neut", "Acc"): "das", ("Neut", "Dat"): "dem", ("Neut", "Gen"): "des",
    (None, "Nom"): "die", (None, "Acc"): "die", (None, "Dat"): "den", (None, "Gen"): "der",
}


def german_article_table() -> dict[str, list[TokenRule]]:
    """Class per gender-case cell ("masc_nom", "fem_dat", "plur_gen", ...), each a definite article with its
    de_core_news_sm morphology, so that "der" as masculine nominative and "der" as feminine dative are told apart."""
    table = {}
    for (gender, case), word in GERMAN_DEFINITE_ARTICLES.items():
        morph = {"PronType": "Art", "Case": case, "Number": "Plur" if gender is None else "Sing"}
        if gender is not None:
            morph["Gender"] = gender
        name = f"{(gender or 'Plur').lower()}_{case.lower()}"
        table[name] = [R(word, pos="DET", morph=morph, form=name)]
    return table
