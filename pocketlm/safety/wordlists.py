"""Word lists and phrase rules of the built-in moderation backend, written for pocketlm.

Scores: 0.9 = clearly in the category, 0.6 = flagged, 0.3 = a weak signal that does not flag alone
(the threshold is 0.5). Words are matched whole after normalization (lower case, look-alike letters,
l33t digits and symbols, s-p-a-c-e-d letters, repeated letters, simple suffixes); phrases are
regular expressions over the normalized words joined by single spaces. The lists are short on
purpose: they catch the obvious cases fast and leave the rest to a classifier or a guard model.
"""

# ---- single words: word -> ((category, score), ...) --------------------------------------------
_PROFANITY = ("fuck", "fucker", "motherfucker", "shit", "bullshit", "asshole", "bitch", "bastard", "cunt",
              "dickhead", "prick", "wanker", "twat", "douchebag", "jackass", "piss")
_INSULTS = ("idiot", "moron", "imbecile", "dumbass", "loser", "scumbag", "halfwit", "numbskull", "cretin")
_SLURS = ("nigger", "nigga", "faggot", "fag", "kike", "spic", "chink", "gook", "wetback", "tranny", "retard",
          "raghead", "towelhead", "dyke", "coon", "beaner")
_SEXUAL = ("porn", "porno", "pornography", "blowjob", "handjob", "cumshot", "dildo", "orgasm", "masturbate",
           "masturbation", "nudes", "xxx", "hentai", "milf", "deepthroat", "gangbang", "erotic")
_SEXUAL_WEAK = ("sex", "sexy", "naked", "nude", "horny", "penis", "vagina", "boobs", "tits", "cock", "pussy", "dick")
# only matter within MINOR_DISTANCE words of a sexual word
_MINORS = ("child", "children", "kid", "kids", "minor", "minors", "underage", "preteen", "preteens", "toddler",
           "toddlers", "loli", "shota", "infant", "infants")
_GRAPHIC = ("gore", "gory", "dismember", "dismembered", "disembowel", "decapitate", "decapitated", "mutilate",
            "mutilated", "beheading", "entrails")
_VIOLENT_WEAK = ("kill", "murder", "stab", "shoot", "strangle", "slaughter", "massacre", "torture", "bomb")
_SELF_HARM_WEAK = ("suicide", "suicidal", "selfharm")

_TABLE = ((_PROFANITY, (("harassment", 0.6),)), (_INSULTS, (("harassment", 0.6),)),
          (_SLURS, (("hate", 0.9), ("harassment", 0.6))), (_SEXUAL, (("sexual", 0.8),)),
          (_SEXUAL_WEAK, (("sexual", 0.3),)), (_GRAPHIC, (("violence/graphic", 0.7), ("violence", 0.5))),
          (_VIOLENT_WEAK, (("violence", 0.3),)), (_SELF_HARM_WEAK, (("self-harm", 0.4),)))
WORDS: dict[str, tuple] = {w: cats for words, cats in _TABLE for w in words}
MINOR_WORDS = frozenset(_MINORS)
MINOR_DISTANCE = 2
SUFFIXES = ("s", "es", "ing", "in", "er", "ers", "ed", "y")  # fucking, idiots, bitches, shitty

# ---- phrases over normalized words --------------------------------------------------------------
# apostrophes split words in normalization: "i'm" is "i m"
_ME = r"(?:i|i m|im|i am|i ll|i will|we|we will|we ll|gonna|going to)"
_YOU = r"(?:you|u|ya|your family|your kids)"
_GROUP = (r"(?:jews|muslims|christians|blacks|whites|asians|arabs|mexicans|immigrants|gays|lesbians|"
          r"trans people|women|men|hindus|sikhs|refugees)")
_KILL = r"(?:kill|murder|shoot|stab|hang|burn|gas|exterminate|slaughter|lynch|behead|wipe out)"
_DRUGS = r"(?:meth|methamphetamine|cocaine|crack|heroin|fentanyl|lsd|mdma|ecstasy)"
_WEAPON = r"(?:bomb|pipe bomb|explosive|explosives|nail bomb|molotov|grenade|nerve gas|sarin|ricin|napalm|ied)"
_HOWTO = r"(?:how (?:do i|to|can i|would i)|ways to|steps to|instructions (?:for|to)|teach me to|help me)"

# (pattern, trigger words: the rule runs only when the text has one of them, categories)
PHRASES: list[tuple[str, str, tuple]] = [
    # threats against the reader
    (rf"{_ME} (?:kill|murder|hurt|shoot|stab|beat|find) {_YOU}", "kill murder hurt shoot stab beat find", (("harassment/threatening", 0.9), ("harassment", 0.7), ("violence", 0.8))),
    (rf"{_YOU} (?:are|r|re) (?:dead|going to die|gonna die)", "dead die", (("harassment/threatening", 0.8), ("violence", 0.6))),
    (r"(?:go )?kill your ?self|kys|go die", "kill kys die", (("harassment/threatening", 0.8), ("harassment", 0.8), ("self-harm", 0.5))),
    # hate with violence
    (rf"(?:{_KILL}|deport|ban) all (?:the )?{_GROUP}", "all", (("hate/threatening", 0.9), ("hate", 0.9), ("violence", 0.8))),
    (rf"{_GROUP} (?:should|must|deserve to) (?:die|be killed|be exterminated|burn|hang)", "should must deserve", (("hate/threatening", 0.9), ("hate", 0.9), ("violence", 0.8))),
    (rf"{_GROUP} are (?:animals|vermin|rats|subhuman|parasites|cockroaches|inferior)", "animals vermin rats subhuman parasites cockroaches inferior", (("hate", 0.8),)),
    # self-harm
    (r"(?:i (?:want|wanna|am going|m going|plan|intend|need) to|i will|i ll|im gonna|i m gonna) (?:kill myself|die|end (?:it all|my life)|cut myself|hurt myself|commit suicide)", "myself die life all suicide",
     (("self-harm/intent", 0.9), ("self-harm", 0.9))),
    (r"(?:kill myself|end my life|commit suicide|cut myself|hurt myself|suicidal thoughts)", "myself life suicide suicidal", (("self-harm", 0.7),)),
    (rf"{_HOWTO} (?:kill myself|commit suicide|end my life|cut myself|overdose|hang myself)|painless (?:way|ways) to die|lethal dose of", "myself suicide life overdose painless lethal",
     (("self-harm/instructions", 0.9), ("self-harm", 0.9))),
    # illicit
    (rf"{_HOWTO} (?:make|cook|synthesize|produce|buy|get|grow) {_DRUGS}", "meth methamphetamine cocaine crack heroin fentanyl lsd mdma ecstasy", (("illicit", 0.9),)),
    (rf"{_HOWTO} (?:launder money|hack into|steal (?:a|someone|credit)|pick a lock|shoplift|make counterfeit|forge)", "launder hack steal pick shoplift counterfeit forge", (("illicit", 0.8),)),
    (rf"{_HOWTO} (?:make|build|assemble|create) (?:a |an )?{_WEAPON}", "bomb explosive explosives molotov grenade gas sarin ricin napalm ied", (("illicit/violent", 0.9), ("illicit", 0.9), ("violence", 0.7))),
    (r"(?:untraceable|ghost) gun|print(?:ed)? (?:a )?gun", "gun", (("illicit/violent", 0.7), ("illicit", 0.7))),
    # graphic violence
    (r"(?:blood|guts|brains) (?:everywhere|splattered|spilling)|ripped (?:his|her|their) (?:guts|heart|eyes) out", "everywhere splattered spilling ripped", (("violence/graphic", 0.7), ("violence", 0.6))),
]
