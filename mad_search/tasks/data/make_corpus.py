"""Regenerate the bundled English corpus, ``corpus.txt``.

The text is descriptive prose produced by a small seeded grammar written for this project: a
gazetteer of an imaginary coast, notes from a workshop and a weather almanac, their paragraphs
interleaved so that every region of the file has the same mixture. It exists so that
``task=text`` runs with no download; it has real English syntax and word statistics, and enough
variety that no 129-byte span of its test region also occurs in its training region.

Run ``python mad_search/tasks/data/make_corpus.py`` to rewrite it (same output every time).
"""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

PREFIXES = """Ash Bel Brack Cal Cor Dun Els Fen Gar Hal Hart Ivel Kel Lin Lud Mar Mel Nor Oak Pen
Quen Ros Sal Sel Stan Thorn Ul Ver Wend Wyn Yar Alder Bram Cress Dor Eld Frost Glen Holl Kings
Lark Moss Nether Orm Pell Rook Shep Tarn Umber Wal""".split()
SUFFIXES = """bury by combe dale den field ford gate ham holm hurst ley mere mouth ness stead stow
thwaite ton wick worth well brook cliff haven moor""".split()
KINDS = ["village", "town", "hamlet", "harbour town", "market town", "fishing port",
         "farming parish", "mill town", "cathedral town", "river port"]
SIZES = ["small", "quiet", "busy", "scattered", "compact", "sleepy", "prosperous", "windswept",
         "sheltered", "old", "modest", "lively"]
SIDES = ["north", "south", "east", "west"]
RIVERS = ["Wend", "Aller", "Tamm", "Severn Reach", "Ouse", "Calder", "Brede", "Lune", "Fal",
          "Otter", "Dart", "Kennet", "Mole", "Avon", "Esk", "Nidd"]
DISTANCES = ["two miles", "half a day's walk", "an hour by cart", "a short ride",
             "three leagues", "a morning's sail", "a mile and a half", "ten minutes on foot"]
BUILDINGS = ["church", "chapel", "guildhall", "market hall", "tithe barn", "watermill",
             "lighthouse", "grammar school", "customs house", "bridge", "castle", "almshouse"]
MATERIALS = ["grey limestone", "red brick", "flint and chalk", "dark granite", "oak timber",
             "honey-coloured sandstone", "rough slate", "whitewashed cob"]
CENTURIES = ["twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
             "eighteenth"]
PARTS = ["tower", "gable", "spire", "arched doorway", "clock", "weathervane", "bell tower",
         "west window", "porch", "stone steps"]
WORKS = ["work on the farms", "fish the outer banks", "keep sheep on the downs",
         "work in the quarries", "weave wool and linen", "trade in timber", "brew ale",
         "make rope and nets", "grow barley and beans", "build small boats", "cut peat",
         "tend orchards of apples and pears"]
SEASONS = ["spring", "summer", "autumn", "winter", "early spring", "late summer",
           "the first weeks of autumn", "the depths of winter"]
FIELDS = ["fields", "meadows", "hedgerows", "orchards", "marshes", "moors", "water meadows",
          "barley fields"]
COLOURS = ["gold", "deep green", "pale yellow", "rust red", "silver grey", "purple", "brown",
           "white with blossom"]
SMELLS = ["cut hay", "wood smoke", "salt and seaweed", "wet earth", "apples", "pine resin",
          "fresh bread", "wild garlic"]
TRANSPORT = ["coach", "river boat", "the coast road", "the old drove road", "ferry", "cart",
             "the carrier's wagon"]
INNS = ["Bell Inn", "Anchor", "Plough and Harrow", "Green Man", "Swan", "King's Head",
        "Wheatsheaf", "Ship", "Three Tuns", "Fox and Hounds"]
FOODS = ["fish stew", "mutton pie", "bread", "cheese", "smoked eel", "cider", "oat cake",
         "pea soup", "apple pudding", "roast fowl"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
GOODS = ["wool", "eggs", "cheese", "salt fish", "baskets", "leather", "pots", "candles", "honey",
         "rope", "cloth", "butter", "timber", "hops", "iron nails", "seed corn"]
EVENTS = ["great flood", "fire", "hard frost", "storm", "fever", "bad harvest", "shipwreck",
          "dry summer"]
CONSEQUENCES = ["half the houses by the water had to be rebuilt",
                "the bridge was carried away and not replaced for a generation",
                "the market was moved to higher ground",
                "many families left for the towns inland",
                "the church bells were rung for three days",
                "the harbour wall was raised by six feet",
                "the mill stood idle for a whole year",
                "the parish sold its common land to pay its debts"]
WIDTHS = ["broad", "narrow", "shallow", "deep", "wide", "fast"]
SPEEDS = ["slow", "clear", "muddy", "quick", "still", "cold"]
RIVER_ACTIONS = ["bends twice", "splits around a wooded island", "drops over a low weir",
                 "widens into a marsh", "runs between steep banks",
                 "passes under an old packhorse bridge"]
VIEWS = ["the whole bay", "three church towers", "the islands", "the hills beyond the river",
         "ships at anchor", "the road winding inland", "the smoke of the next town"]
HILLS = ["Beacon Hill", "the downs", "the old quarry", "the church tower", "Gallows Knoll",
         "the sea cliffs", "Windmill Ridge"]
SKILLS = ["row", "swim", "mend a net", "ride", "milk a cow", "read the tides", "climb",
          "handle a sail"]
WEATHER_ADJ = ["mild", "damp", "changeable", "fair", "windy", "grey", "bright", "cool"]
WEATHER_EVENTS = ["sea fogs", "gales", "heavy showers", "hailstorms", "long frosts",
                  "thunderstorms", "floods"]
DIRECTIONS = ["north", "south", "east", "west", "uphill", "down to the shore", "inland"]
LANDMARKS = ["the smithy", "the pound", "a row of cottages", "the old well", "the schoolhouse",
             "a ruined chapel", "the ropewalk", "a stone cross", "the tannery", "the vicarage",
             "the pond", "the lime kilns"]
LEGENDS = ["a bell lies under the sands and can be heard on stormy nights",
           "the first house was built by a shipwrecked sailor",
           "the well never freezes, even in the hardest winter",
           "a giant threw the standing stone from the hills",
           "the river once ran the other way",
           "a hoard of silver is buried under the market cross",
           "the ferryman's ghost still waits for the last passenger",
           "no one born here has ever drowned"]

OBJECTS = ["a stool", "a basket", "a wooden spoon", "a rope ladder", "a box", "a lantern",
           "a garden gate", "a shelf", "a bread board", "a small boat", "a wheelbarrow",
           "a bird table", "a chair", "a gate latch", "a candle holder", "a rake"]
STUFF = ["ash", "oak", "willow", "elm", "beech", "pine", "cherry wood", "hazel", "iron", "copper",
         "brass", "hemp", "leather", "cane"]
TOOLS = ["a saw", "a chisel", "a plane", "a drill", "a mallet", "a file", "a knife", "a rasp",
         "a square", "a clamp", "a spokeshave", "an awl"]
STEPS = ["mark out the {n} pieces with a pencil and {tool}",
         "cut each piece {k} inches longer than you need",
         "plane every face flat with {tool} and check it against a straight edge",
         "soak the {stuff} strips in warm water for {n} hours",
         "drill {n} holes before you bend anything",
         "fit the joints dry before you glue them, and mark each pair with {tool}",
         "round the edges with {tool} so that they will not split",
         "rub the {stuff} with linseed oil and let it dry for {n} days",
         "clamp the frame and leave it for {n} hours",
         "sand the whole thing with fine paper, working along the {stuff}",
         "measure the diagonals to be sure that the frame is square",
         "heat the {stuff} until it glows a dull red",
         "let it cool slowly in the ashes for {n} hours",
         "mark the centre of each piece with {tool}",
         "trim the ends flush with the sides, using {tool}"]
STATES = ["dry", "smooth", "warm", "flat", "soft", "set", "cool", "square", "clean"]
MISTAKES = ["cutting against the grain", "using green wood", "rushing the glue",
            "forgetting to measure twice", "working with a blunt blade",
            "leaving the work in the damp", "driving the nails too close to the edge"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WINDS = ["from the west", "from the south-west", "from the north", "from the east",
         "from the sea", "off the hills", "light and variable"]
SKY = ["clear skies", "low cloud", "broken cloud", "a thin haze", "bright sunshine",
       "heavy overcast", "high thin cloud"]
CROPS = ["the wheat", "the barley", "the hay", "the apples", "the potatoes", "the beans",
         "the hops", "the turnips"]
FARM_WORK = ["ploughing", "sowing", "lambing", "shearing", "haymaking", "the harvest",
             "hedging", "threshing", "picking fruit", "digging drains"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]


def a(word: str) -> str:
    """The word with its indefinite article."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def place_name(r: random.Random) -> str:
    return r.choice(PREFIXES) + r.choice(SUFFIXES)


def gazetteer_paragraph(r: random.Random) -> str:
    name, other = place_name(r), place_name(r)
    pick = r.choice
    s = [f"{name} is a {pick(SIZES)} {pick(KINDS)} on the {pick(SIDES)} bank of the "
         f"{pick(RIVERS)}, {pick(DISTANCES)} from {other}."]
    options = [
        f"The {pick(BUILDINGS)} at the centre of the {pick(KINDS).split()[-1]} was built of "
        f"{pick(MATERIALS)} in the {pick(CENTURIES)} century, and its {pick(PARTS)} can still be "
        f"seen from the {pick(SIDES)} road.",
        f"Most of the people here {pick(WORKS)}, although a few families still "
        f"{pick(WORKS)} as their grandparents did.",
        f"In {pick(SEASONS)} the {pick(FIELDS)} around {name} turn {pick(COLOURS)}, and the air "
        f"smells of {pick(SMELLS)}.",
        f"Travellers who arrive by {pick(TRANSPORT)} usually stop at the {pick(INNS)}, where the "
        f"{pick(FOODS)} is said to be the best for {pick(NUMBERS)} miles around.",
        f"Every {pick(WEEKDAYS)} there is a market in the square, selling "
        f"{', '.join(r.sample(GOODS, 2))} and {pick(GOODS)}.",
        f"Old records mention a {pick(EVENTS)} in the year {r.randint(1150, 1890)}, when "
        f"{pick(CONSEQUENCES)}.",
        f"The {pick(RIVERS)} here is {pick(WIDTHS)} and {pick(SPEEDS)}, and it "
        f"{pick(RIVER_ACTIONS)} before it reaches the sea near {place_name(r)}.",
        f"On clear mornings you can see {pick(VIEWS)} from the top of {pick(HILLS)}.",
        f"Children in {name} learn to {pick(SKILLS)} before they learn to read, or so the "
        f"saying goes.",
        f"The weather is {pick(WEATHER_ADJ)} for most of the year, but {pick(WEATHER_EVENTS)} "
        f"are common in {pick(SEASONS)}.",
        f"A narrow lane leads {pick(DIRECTIONS)} past {pick(LANDMARKS)} to {pick(LANDMARKS)}.",
        f"Local people say that {pick(LEGENDS)}.",
        f"The population was {r.randint(80, 4000)} at the last count, "
        f"{pick(['a little more', 'rather less', 'about the same'])} than it was "
        f"{pick(NUMBERS)} years before.",
        "There are {} inns, {} and {}, but no {}, which the people of {} never tire of "
        "pointing out.".format(pick(NUMBERS), *map(a, r.sample(BUILDINGS, 2)),
                               pick(BUILDINGS[:6]), other),
    ]
    s += r.sample(options, r.randint(3, 6))
    return " ".join(s)


def workshop_paragraph(r: random.Random) -> str:
    pick = r.choice
    thing, stuff = pick(OBJECTS), pick(STUFF)
    tools = r.sample(TOOLS, 3)
    steps = [step.format(n=pick(NUMBERS), k=r.randint(1, 9), tool=pick(tools), stuff=stuff)
             for step in r.sample(STEPS, r.randint(3, 5))]
    s = [f"To make {thing} from {stuff}, you will need {tools[0]}, {tools[1]} and {tools[2]}."]
    s.append(f"First, {steps[0]}.")
    for step in steps[1:-1]:
        s.append(f"{pick(['Then', 'Next', 'After that', 'When that is done'])}, {step}.")
    s.append(f"When the {stuff} is {pick(STATES)}, {steps[-1]}.")
    s.append(f"The commonest mistake with {stuff} is {pick(MISTAKES)}, which will spoil "
             f"{thing} in {pick(['a week', 'a season', 'a year', 'no time at all'])}.")
    if r.random() < 0.5:
        s.append(f"A good {thing.split(' ', 1)[1]} should last for {pick(NUMBERS)} years or more "
                 f"if it is kept {pick(STATES)} and {pick(STATES)}.")
    return " ".join(s)


def almanac_paragraph(r: random.Random) -> str:
    pick = r.choice
    month = pick(MONTHS)
    s = [f"In {month} the wind is most often {pick(WINDS)}, with {pick(SKY)} in the mornings "
         f"and {pick(SKY)} by evening."]
    options = [
        f"Rain falls on about {r.randint(4, 22)} days of the month, most of it "
        f"{pick(['at night', 'in the afternoons', 'in short showers', 'on the hills'])}.",
        f"It is a good month for {pick(FARM_WORK)}, and for {pick(FARM_WORK)} if the ground is "
        f"{pick(['dry', 'soft', 'firm', 'not frozen'])}.",
        f"Farmers watch {pick(CROPS)} closely, because a {pick(EVENTS)} now can ruin a "
        f"whole year.",
        f"The days grow {pick(['longer', 'shorter'])} by about {r.randint(2, 4)} minutes each "
        f"day.",
        f"An old rhyme says that a {pick(WEATHER_ADJ)} {month} brings a "
        f"{pick(WEATHER_ADJ)} {pick(MONTHS)}.",
        f"The highest tides of {month} come {pick(['at the new moon', 'at the full moon'])}, "
        f"and with a wind {pick(WINDS)} they can flood "
        f"{pick(['the lower streets', 'the quay', 'the marsh road', 'the cellars'])} of "
        f"{place_name(r)}.",
        f"Birds {pick(['gather on the marshes', 'leave for the south', 'return to the cliffs', 'nest in the hedges'])}"  # noqa: E501
        f", and the {pick(FIELDS)} are {pick(COLOURS)}.",
    ]
    s += r.sample(options, r.randint(2, 4))
    return " ".join(s)


def write_corpus(path: Path, paragraphs: int = 560, seed: int = 2024) -> Path:
    """Write ``paragraphs`` paragraphs of the grammar's prose, seeded, to ``path`` (the bundled
    corpus is 560 paragraphs with seed 2024; benchmarks write larger ones to their cache)."""
    r = random.Random(seed)
    makers = [gazetteer_paragraph] * 5 + [workshop_paragraph] * 2 + [almanac_paragraph] * 3
    text = [textwrap.fill(r.choice(makers)(r), width=88) for _ in range(paragraphs)]
    path.write_text("\n\n".join(text) + "\n", encoding="utf-8")
    return path


def main() -> None:
    write_corpus(HERE / "corpus.txt")


if __name__ == "__main__":
    main()
