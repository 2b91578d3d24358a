"""Deterministic training text for the demo tokenizer.

The text is generated from the word lists below and a fixed seed with Python's own
``random.Random`` (Mersenne Twister, whose ``random()`` and ``choice()`` are stable across
platforms and Python versions), so the tokenizer trained on it is the same on every machine.
"""

import random

ENGLISH = """
the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late
run don't while press close night real life few north open seem together next white children
begin got walk example ease paper group always music those both mark often letter until mile
river car feet care second book carry took science eat room friend began idea fish mountain
stop once base hear horse cut sure watch color face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half
rock order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star
box noun field rest correct able pound done beauty drive stood contain front teach week final
gave green quick develop ocean warm free minute strong special mind behind clear tail produce
fact street inch multiply nothing course stay wheel full force blue object decide surface deep
moon island foot system busy test record boat common gold possible plane stead dry wonder laugh
thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among file code server memory model request response token stream error
message user assistant tool result function value string number array object field return
""".split()

CODE = """
def return if else elif for while in not and or import from class self None True False try
except finally with as yield lambda pass break continue raise async await fn let mut pub impl
struct enum match use mod const static trait where Some Ok Err Result Option Vec String
usize u8 u32 u64 i32 i64 f32 f64 bool str println! format! assert! unwrap expect clone into
iter map filter collect len push get insert remove new default config main test args
print open read write path data items key value name list dict int float json http
""".split()

PUNCT = [".", ",", ";", ":", "!", "?", "(", ")", "[", "]", "{", "}", "<", ">", "=", "==",
         "+", "-", "*", "/", "%", "&", "|", "^", "~", "#", "@", "$", "'", '"', "`", "\\",
         "_", "->", "=>", "::", "//", "/*", "*/", "&&", "||", "!=", "<=", ">=", "+=", "\n",
         "\t", "    "]


SUFFIXES = ["", "", "", "s", "ed", "ing", "er", "ly", "tion", "ment", "ness", "able", "al", "ful"]
PREFIXES = ["", "", "", "", "", "re", "un", "in", "pre", "de", "dis", "over", "sub", "inter"]


def _word(rng: random.Random) -> str:
    w = rng.choice(ENGLISH)
    if rng.random() < 0.35:
        w = rng.choice(PREFIXES) + w + rng.choice(SUFFIXES)
    return w


def _sentence(rng: random.Random) -> str:
    words = [_word(rng) for _ in range(rng.randint(4, 16))]
    words[0] = words[0].capitalize()
    if rng.random() < 0.3:
        words.insert(rng.randint(1, len(words)), ",")
    return " ".join(words).replace(" ,", ",") + rng.choice([".", ".", ".", "?", "!"])


def _code_line(rng: random.Random) -> str:
    indent = "    " * rng.randint(0, 3)
    ident = "_".join(_word(rng).lower() for _ in range(rng.randint(1, 3)))
    kw = rng.choice(CODE)
    shape = rng.randint(0, 5)
    if shape == 0:
        return f"{indent}def {ident}(self, {rng.choice(CODE)}):"
    if shape == 1:
        return f"{indent}{ident} = {rng.choice(CODE)}({rng.randint(0, 999)})"
    if shape == 2:
        return f"{indent}let {ident}: {kw} = {ident}.{rng.choice(CODE)}();"
    if shape == 3:
        return f'{indent}{{"{ident}": "{rng.choice(ENGLISH)}", "{kw}": {rng.randint(0, 99)}}}'
    if shape == 4:
        return f"{indent}return {ident} {rng.choice(PUNCT)} {rng.choice(CODE)}"
    return f"{indent}# {_sentence(rng)}"


def ascii_alphabet() -> str:
    """Every printable ASCII character, with newline and tab."""
    return "".join(chr(c) for c in range(32, 127)) + "\n\t"


def generate(seed: int = 20260101, lines: int = 60000):
    """Yields lines of English-like prose and code, the same lines for the same seed."""
    rng = random.Random(seed)
    # Each character on its own, so that every one is in the vocabulary.
    yield ascii_alphabet()
    for _ in range(lines):
        if rng.random() < 0.5:
            yield " ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) + "\n"
        else:
            yield "\n".join(_code_line(rng) for _ in range(rng.randint(1, 6))) + "\n"
