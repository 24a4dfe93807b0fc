"""The facts task: a seeded synthetic database of people, questions about them, a lookup tool and a reward.

The experiment of Houliston, Odonnat, Arnal and Cabannes, *Provable Benefits of In-Tool Learning for Large Language
Models* (arXiv 2508.20755), with asymre's own generator (no file of theirs is used): N people (first name x last
name), each with the paper's four attributes (birth date D/M/YYYY in 1950-2000, birth place one of 7 countries,
current address one of 200 cities, occupation one of 100), questions in three phrasings per attribute, and a
reward that normalises the answer and counts it right when the attribute's value appears in it (the paper's rule).

Two ways to learn the facts (`task.facts.mode`):
- `in_tool`: the policy may query the database through `lookup(name, attribute)`, the `FactsDatabase` environment's
  tool (TRL's environment_factory form: the database is the environment's, never the prompt's); the system prompt
  teaches the call syntax: the paper's `FIND attribute FOR name` in a fenced block (rollout.tool_parser=find), or
  the template's JSON tool call (hermes with model.chat_template=chatml-tools).
- `in_weight`: no tool; the policy must answer from its weights.

Splits: a seeded share of the people (`task.facts.held_out_share`) is held out: no training prompt names them; the
evaluation asks about them (`task.facts.eval_on=held_out`, the paper's out-of-distribution test) or about the
trained people (`trained`: recall). `demonstrations` writes the episodes an expert would have (the warm-start's
supervised data, `warm_start.*`): a call and the answer in-tool, the answer alone in-weight.
"""

from __future__ import annotations

import datetime
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from asymre.data import Prompt

ATTRIBUTES = ("birth_date", "birth_place", "address", "occupation")
NO_RECORD = "no such record"

FIRST_NAMES = (
    "Aaron Abigail Adrian Alice Amelia Andrew Anna Anthony Arthur Audrey Benjamin Bianca Caleb Camille Carlos Caroline "
    "Cecilia Charles Chloe Claire Daniel Daphne David Diana Dominic Dorothy Edgar Edith Edward Elena Elias Eliza Emil "
    "Emma Ethan Eva Felix Fiona Francis Frida George Grace Gregory Hannah Harold Harriet Hector Helen Henry Hugo Ian "
    "Irene Isaac Isabel Ivan Ivy Jack Jasmine Jonas Josephine Julian Julia Karl Katherine Kevin Laura Leo Leonora "
    "Lewis Lily Lucas Lucy Marcus Margaret Martin Maya Michael Miriam Nathan Nina Noah Nora Oliver Olivia Oscar Paula "
    "Peter Philippa Quentin Rachel Raphael Rebecca Robert Rosa Samuel Sarah Sebastian Sophia Stefan Stella Thomas "
    "Theresa Tobias Ursula Victor Vera Walter Wendy Xavier Yvonne Zachary Zoe Albert Agnes Bruno Beatrice Conrad "
    "Clara Dennis Delia Elliot Esther"
).split()
LAST_NAMES = (
    "Abbott Alvarez Anderson Archer Baker Barnes Becker Bennett Bishop Blake Bowman Brennan Brooks Burke Carter "
    "Castillo Chandler Clarke Coleman Collins Cooper Crawford Dalton Davies Dawson Delgado Dixon Doyle Duncan Ellis "
    "Emerson Evans Farrell Fischer Fleming Fletcher Foster Fraser Garcia Gardner Gibson Gordon Graham Grant Griffin "
    "Hale Hamilton Hansen Harper Hayes Henderson Hoffman Holland Hughes Hunter Jansen Jenkins Jordan Keller Kennedy "
    "Klein Knight Lambert Larsen Lawson Lehmann Lindqvist Lowe Lucero Mackenzie Marsh Mendez Meyer Mitchell Moreau "
    "Morgan Murphy Nash Nielsen Novak Nolan Ortega Owens Palmer Parker Pearson Perez Porter Quinn Ramsey Reed Reyes "
    "Richter Rivera Roberts Rossi Russo Sanders Schmidt Shaw Silva Sinclair Sullivan Tanaka Taylor Thornton Torres "
    "Turner Vasquez Vogel Wagner Walsh Warren Weber Wheeler Whitaker Wilson Winter Wolfe Young Zimmer Baxter Bauer "
    "Conway Draper Ferris Garner"
).split()
COUNTRIES = ("France", "Germany", "Italy", "Spain", "Japan", "Brazil", "Canada")
CITIES = (
    "Amsterdam Athens Auckland Austin Baltimore Bangkok Barcelona Basel Beijing Belfast Belgrade Bergen Berlin Bern "
    "Bilbao Birmingham Bologna Bordeaux Boston Bratislava Bremen Brighton Brisbane Bristol Brussels Bucharest Budapest "
    "Cairo Calgary Cambridge Canberra Cardiff Chicago Cologne Copenhagen Cork Dallas Delhi Denver Detroit Dresden "
    "Dublin Dundee Durban Edinburgh Eindhoven Florence Frankfurt Geneva Genoa Ghent Glasgow Gothenburg Granada Graz "
    "Hamburg Hanoi Hanover Havana Helsinki Houston Innsbruck Istanbul Jakarta Kyoto Lagos Lausanne Leeds Leipzig Lille "
    "Lima Lisbon Liverpool Ljubljana London Lyon Madrid Malaga Manchester Manila Marseille Melbourne Memphis Miami "
    "Milan Montreal Moscow Munich Nairobi Nantes Naples Nashville Nice Oslo Ottawa Oxford Palermo Paris Perth Philadelphia "
    "Phoenix Porto Prague Quebec Reykjavik Riga Rome Rotterdam Salzburg Santiago Seattle Seoul Seville Shanghai Singapore "
    "Sofia Stockholm Strasbourg Stuttgart Sydney Taipei Tallinn Tampere Tokyo Toronto Toulouse Turin Utrecht Valencia "
    "Vancouver Venice Verona Vienna Vilnius Warsaw Wellington Winnipeg Zagreb Zurich Aberdeen Adelaide Alicante Antwerp "
    "Aarhus Bari Bath Bonn Cadiz Catania Chester Coimbra Cordoba Dijon Dortmund Exeter Essen Faro Galway Grenoble Halifax "
    "Heidelberg Krakow Kiel Leiden Limerick Linz Lucerne Lund Mainz Malmo Montpellier Murcia Nottingham Nuremberg Odense "
    "Padua Pisa Plymouth Poznan Reims Rennes Regina Siena Split Tartu Trieste Tromso Turku Uppsala Victoria Vigo Wroclaw "
    "York Zaragoza Accra Ankara Boise Dakar Lugano Tampa"
).split()
OCCUPATIONS = (
    "accountant,actor,architect,archivist,astronomer,baker,banker,barber,biologist,bookbinder,botanist,brewer,"
    "bricklayer,butcher,carpenter,cartographer,chef,chemist,choreographer,cobbler,composer,dentist,designer,diplomat,"
    "economist,editor,electrician,engineer,farmer,firefighter,fisherman,florist,gardener,geologist,glassblower,"
    "goldsmith,historian,illustrator,interpreter,jeweller,journalist,judge,lawyer,librarian,linguist,locksmith,"
    "mathematician,mechanic,midwife,miner,musician,nurse,optician,painter,paramedic,pharmacist,philosopher,"
    "photographer,physicist,physiotherapist,pianist,pilot,plumber,poet,police officer,potter,printer,programmer,"
    "psychologist,radiologist,sailor,sculptor,shepherd,shoemaker,singer,social worker,sociologist,statistician,"
    "surgeon,surveyor,tailor,teacher,translator,upholsterer,veterinarian,violinist,watchmaker,weaver,welder,"
    "winemaker,zoologist,acrobat,auctioneer,beekeeper,blacksmith,cellist,curator,falconer,lighthouse keeper,cook"
).split(",")

QUESTIONS = {
    "birth_date": ("When was {name} born?", "What is {name}'s date of birth?", "On what date was {name} born?"),
    "birth_place": ("Where was {name} born?", "In which country was {name} born?", "What is {name}'s birth place?"),
    "address": ("Where does {name} live?", "In which city does {name} live?", "What is {name}'s current address?"),
    "occupation": ("What is {name}'s occupation?", "What does {name} do for a living?", "What is {name}'s job?"),
}
ANSWERS = {"birth_date": "{name} was born on {value}.", "birth_place": "{name} was born in {value}.",
           "address": "{name} lives in {value}.", "occupation": "{name} works as {article} {value}."}
IN_TOOL_SYSTEM = ("You answer questions about people by looking them up in a database. To look a fact up, write only\n"
                  "```\nFIND <attribute> FOR <full name>\n```\nwhere <attribute> is one of birth_date, birth_place, address, "
                  "occupation; the database replies, then you answer in one sentence.")
IN_TOOL_SYSTEM_JSON = ("You answer questions about people by looking them up with the lookup tool (attribute: one of "
                       "birth_date, birth_place, address, occupation); then you answer in one sentence.")
_FIRST_DAY, _LAST_DAY = datetime.date(1950, 1, 1).toordinal(), datetime.date(2000, 12, 31).toordinal()


@dataclass(frozen=True)
class Person:
    name: str
    birth_date: str  # D/M/YYYY, no leading zeros
    birth_place: str
    address: str
    occupation: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)


@lru_cache(maxsize=16)
def database(num_people: int, seed: int = 0) -> tuple[Person, ...]:
    """`num_people` people with distinct names and seeded attributes; the same (num_people, seed) always gives the
    same database, and a larger database with the same seed starts with the smaller one's people."""
    limit = len(FIRST_NAMES) * len(LAST_NAMES)
    if not 1 <= num_people <= limit:
        raise ValueError(f"task.facts.num_people={num_people}: expected 1..{limit} (distinct first x last names)")
    rng = random.Random(f"asymre-facts-{seed}")
    names = [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(names)
    people = []
    for name in names[:num_people]:
        day = datetime.date.fromordinal(rng.randint(_FIRST_DAY, _LAST_DAY))
        people.append(Person(name, f"{day.day}/{day.month}/{day.year}", rng.choice(COUNTRIES), rng.choice(CITIES),
                             rng.choice(OCCUPATIONS)))
    return tuple(people)


def split(people: tuple[Person, ...], held_out_share: float, seed: int = 0) -> tuple[list[Person], list[Person]]:
    """(trained people, held-out people): a seeded share held out, at least one on each side."""
    if not 0.0 < held_out_share < 1.0:
        raise ValueError(f"task.facts.held_out_share={held_out_share}: expected a share in (0, 1)")
    if len(people) < 2:
        raise ValueError("task.facts.num_people: the split needs at least 2 people (one trained, one held out)")
    order = list(people)
    random.Random(f"asymre-facts-split-{seed}").shuffle(order)
    n_held = min(max(1, round(len(order) * held_out_share)), len(order) - 1)
    return order[n_held:], order[:n_held]


def system_prompt(mode: str, tool_parser: str) -> str | None:
    if mode == "in_weight":
        return None
    return IN_TOOL_SYSTEM if tool_parser == "find" else IN_TOOL_SYSTEM_JSON


def question(person: Person, attribute: str, phrasing: int, num_people: int, seed: int, system: str | None) -> Prompt:
    text = QUESTIONS[attribute][phrasing % len(QUESTIONS[attribute])].format(name=person.name)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return Prompt(uid=f"facts:{person.name}:{attribute}:{phrasing}", messages=messages,
                  columns={"answer": person.get(attribute), "person": person.name, "attribute": attribute,
                           "facts_num_people": num_people, "facts_seed": seed})


def build(task, tool_parser: str = "find") -> tuple[list[Prompt], list[Prompt]]:
    """`task` is a TaskConfig with name 'facts'. Training prompts: every trained person x chosen attribute x phrasing
    (repeated up to task.train_size when it is larger, 0 = each once); evaluation: one question per person and
    attribute of the evaluated split, phrasings rotating, the first task.eval_size."""
    f = task.facts
    bad = [a for a in f.attributes if a not in ATTRIBUTES]
    if bad or not f.attributes:
        raise ValueError(f"task.facts.attributes: {bad or 'empty'}; expected some of {list(ATTRIBUTES)}")
    if f.mode not in ("in_tool", "in_weight"):
        raise ValueError(f"task.facts.mode={f.mode!r}: expected 'in_tool' or 'in_weight'")
    if f.eval_on not in ("held_out", "trained"):
        raise ValueError(f"task.facts.eval_on={f.eval_on!r}: expected 'held_out' or 'trained'")
    trained, held = split(database(f.num_people, f.seed), f.held_out_share, f.seed)
    system = task.system_prompt if task.system_prompt is not None else system_prompt(f.mode, tool_parser)
    train = [question(p, a, k, f.num_people, f.seed, system) for p in trained for a in f.attributes for k in range(3)]
    random.Random(task.seed).shuffle(train)
    if task.train_size:
        train = [train[i % len(train)] for i in range(task.train_size)]
    people = held if f.eval_on == "held_out" else trained
    evals = [question(p, a, i + j, f.num_people, f.seed, system) for i, p in enumerate(people) for j, a in enumerate(f.attributes)]
    random.Random(task.seed + 1).shuffle(evals)
    return train, evals[: task.eval_size]


# ------------------------------------------------------------------------------------------------------ the tool
class FactsDatabase:
    """The database as an environment (TRL's environment_factory form): one instance per episode, reset on the row
    (whose `facts_num_people` / `facts_seed` columns name the database), `lookup` its one tool."""

    def reset(self, facts_num_people: int = 0, facts_seed: int = 0, **row) -> None:
        self.people = {p.name.lower(): p for p in database(int(facts_num_people), int(facts_seed))} if facts_num_people else {}
        self.queries: list[tuple[str, str]] = []
        return None

    def lookup(self, name: str, attribute: str) -> str:
        """
        Look up one attribute of a person in the database.

        Args:
            name: The person's full name, e.g. "Ada Baker".
            attribute: One of birth_date, birth_place, address, occupation.

        Returns:
            The attribute's value, or "no such record".
        """
        self.queries.append((name, attribute))
        person = getattr(self, "people", {}).get(" ".join(str(name).split()).lower())
        attribute = str(attribute).strip().lower()
        if person is None or attribute not in ATTRIBUTES:
            return NO_RECORD
        return person.get(attribute)


# ---------------------------------------------------------------------------------------------------- the reward
_DATE = re.compile(r"\b0*(\d{1,2})\s*/\s*0*(\d{1,2})\s*/\s*(\d{4})\b")


def normalise(text: str) -> str:
    """Lower case, dates without leading zeros, punctuation (but a date's slashes) turned into spaces, spaces collapsed."""
    text = _DATE.sub(r"\1/\2/\3", text.lower())
    return " ".join(re.sub(r"[^0-9a-z/]+", " ", text).split())


def _final_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    said = [m.get("content") or "" for m in completion if m.get("role") == "assistant"]
    return said[-1] if said else ""


def facts_reward(prompts, completions, answer: list[str] | None = None, **_) -> list[float | None]:
    """1.0 when the answer's normalised text contains the attribute's value as whole words (the paper's rule), else 0.0;
    reads an episode's final answer (the last assistant turn), so a value seen only in a tool result does not count."""
    if answer is None:
        raise ValueError("the facts reward needs the prompts' `answer` column")
    out: list[float | None] = []
    for c, a in zip(completions, answer):
        out.append(float(f" {normalise(str(a))} " in f" {normalise(_final_text(c))} "))
    return out


def demonstrations(prompts: list[Prompt], mode: str, tool_parser: str = "find") -> list[list[dict]]:
    """The episode an expert would have for each prompt, as chat messages after the prompt's own: in-tool, the call
    (the FIND block for the `find` parser, else a structured tool call the template renders), the database's reply
    and the answer; in-weight, the answer."""
    out = []
    for p in prompts:
        name, attribute, value = p.columns["person"], p.columns["attribute"], p.columns["answer"]
        article = "an" if value[0] in "aeiou" else "a"
        answer = {"role": "assistant", "content": ANSWERS[attribute].format(name=name, value=value, article=article)}
        if mode == "in_weight":
            out.append([answer])
            continue
        if tool_parser == "find":
            call = {"role": "assistant", "content": f"```\nFIND {attribute} FOR {name}\n```"}
        else:
            call = {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "lookup", "arguments": {"name": name, "attribute": attribute}}}]}
        out.append([call, {"role": "tool", "name": "lookup", "content": value}, answer])
    return out
