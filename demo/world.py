"""The demo's synthetic world: what a tiny pretrained model "knows", the instructions its chat
stage teaches, and the skills it then learns one after another.

Knowledge (the stand-in for NaturalQuestions / TriviaQA): fictional people with a birth city,
birth year, profession and employer, rendered as biographies in varied wording and as closed-book
questions "Q: In which city was Ilvo Marrek born?\\nA: Quorra". The pretraining text holds every
entity's biography AND its question/answer lines (each as its own document), so the base model
learns to answer in exactly the format the knowledge probes use; the probes ask these same
questions, which measure how much of the base model's knowledge survives fine-tuning.

General instruction tasks (the stand-in for Tulu V2, and on held-out instances for the general
benchmarks): ten short tasks in Tulu's chat format, each with its own instruction wording, that
the chat stage trains together so that the model learns to read the instruction.

Continual tasks (the stand-in for TRACE): four new skills with their own instructions, trained one
after another from the chat model: classification, generation, multiple choice, arithmetic.

Every task has disjoint train and test splits. Everything is a pure function of (seed, sizes):
the same arguments give the same files, byte for byte.
"""
from __future__ import annotations

import json
import os
import random

SYLLABLES = ("ka ri mo lu ve ta no si be dra gon fel wi ath or mir zan qu el tor ny ul sa pe "
             "ro vin da lo ke th").split()
CITIES = ("Quorra Belmont Tarvik Ostrana Pellwick Duneholm Varenza Kelso Miravel Sunport "
          "Arvana Thornby Calder Estrin Norwood Halvik").split()
PROFESSIONS = ("baker painter surgeon pilot teacher engineer farmer lawyer chemist sailor "
               "architect librarian").split()
EMPLOYERS = ("Brightwell Corvane Lumetra Stonegate Halberd Nimbus Ravelle Orbis Tessaly Quill "
             "Marlow Zephra").split()
ATTRIBUTES = ("city", "year", "profession", "employer")
QUESTIONS = {
    "city": "In which city was {name} born?",
    "year": "In which year was {name} born?",
    "profession": "What is the profession of {name}?",
    "employer": "Which company does {name} work for?",
}
BIO_SENTENCES = {
    "city": ["{name} was born in {city}.", "{name} grew up in {city}, the city of their birth.",
             "The city of {city} is where {name} was born."],
    "year": ["{name} was born in {year}.", "The year {year} saw the birth of {name}.",
             "{name} came into the world in {year}."],
    "profession": ["{name} works as a {profession}.", "By profession, {name} is a {profession}.",
                   "{name} earns a living as a {profession}."],
    "employer": ["{name} is employed by {employer}.", "{name} works for the company {employer}.",
                 "At {employer}, {name} has worked for many years."],
}


def make_entities(n: int, seed: int) -> list[dict]:
    """n people with unique two-word names and independently drawn attributes."""
    rng = random.Random(f"entities/{seed}")
    names, people = set(), []
    while len(people) < n:
        first = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        name = f"{first} {last}"
        if name in names:
            continue
        names.add(name)
        people.append({"name": name, "city": rng.choice(CITIES),
                       "year": str(rng.randint(1900, 1999)),
                       "profession": rng.choice(PROFESSIONS), "employer": rng.choice(EMPLOYERS)})
    return people


def qa_pairs(person: dict) -> list[dict]:
    """The closed-book questions about one person as {"question", "answer"} records, the
    knowledge-probe format eval.py prompts as "Q: {question}\\nA:" and scores by exact match."""
    return [{"question": QUESTIONS[a].format(name=person["name"]), "answer": person[a]}
            for a in ATTRIBUTES]


def biography(person: dict, rng: random.Random) -> list[str]:
    """A person's biography as two short paragraphs, two attributes each, in a random order and a
    random wording (short documents pad less in a batch than one long one)."""
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    return [" ".join(rng.choice(BIO_SENTENCES[a]).format(**person) for a in half)
            for half in (order[:2], order[2:])]


def pretrain_docs(people: list[dict], seed: int) -> list[dict]:
    """The pretraining corpus as {"text"} documents: biographies, and each question with its answer
    as a document of its own, "Q: {question}\\nA: {answer}" then eos, so the answer is never in
    the context and the model learns to stop after it, as the probes need."""
    rng = random.Random(f"pretrain/{seed}")
    docs = [{"text": para} for p in people for para in biography(p, rng)]
    docs += [{"text": f"Q: {q['question']}\nA: {q['answer']}"} for p in people for q in qa_pairs(p)]
    rng.shuffle(docs)
    return docs


def knowledge_probes(people: list[dict], n: int, seed: int) -> list[dict]:
    """A fixed sample of n closed-book questions, scored by exact match."""
    rng = random.Random(f"probes/{seed}")
    qs = [q for p in people for q in qa_pairs(p)]
    return rng.sample(qs, min(n, len(qs)))


# Instruction tasks: each generator returns (instruction, answer) for a random instance. They use
# words the base model has read (names, cities, professions, companies, digits), so a task is a
# new skill over familiar tokens, as fine-tuning a pretrained LLM is. Every task has its own
# instruction wording, so a model that does several of them must read the instruction.

def _words(rng, pool, k):
    return " ".join(rng.sample(pool, k))


def _name(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


# The general instruction tasks: the chat stage's mixture (the stand-in for Tulu V2) and, on
# held-out instances, the general-ability measure (the stand-in for MMLU, BBH, ...).

def _g_sort(rng):
    digits = [str(rng.randint(0, 9)) for _ in range(4)]
    return f"Sort the digits: {' '.join(digits)}", " ".join(sorted(digits))


def _g_next(rng):
    a = rng.randint(1100, 1998)
    return f"Which number comes after {a}?", str(a + 1)


def _g_count(rng):
    k = rng.randint(2, 6)
    return f"How many words are there in: {_words(rng, PROFESSIONS, k)}", str(k)


def _g_first(rng):
    words = rng.sample(EMPLOYERS, rng.randint(3, 4))
    return f"Say the first word of: {' '.join(words)}", words[0]


def _g_last(rng):
    words = rng.sample(EMPLOYERS, rng.randint(3, 4))
    return f"Say the last word of: {' '.join(words)}", words[-1]


def _g_compare(rng):
    a, b = rng.sample(range(10, 100), 2)
    return f"Answer yes or no: is {a} larger than {b}?", "yes" if a > b else "no"


def _g_parity(rng):
    a = rng.randint(1100, 1998)
    return f"Answer even or odd: {a}", "odd" if a % 2 else "even"


def _g_find_city(rng):
    words = [rng.choice(CITIES), rng.choice(PROFESSIONS), rng.choice(EMPLOYERS)]
    city = words[0]
    rng.shuffle(words)
    return f"Find the city in: {' '.join(words)}", city


def _g_read(rng):
    name, city = f"{_name(rng)} {_name(rng)}", rng.choice(CITIES)
    return f"Read and answer: {name} lives in {city}. Where does {name} live?", city


KINDS = {**{w: "city" for w in CITIES}, **{w: "profession" for w in PROFESSIONS},
         **{w: "company" for w in EMPLOYERS}}


def _g_kinds(rng):
    words = rng.sample(sorted(KINDS), 3)
    return f"Name the kind of each word: {' '.join(words)}", " ".join(KINDS[w] for w in words)


def _which_one(rng, kind: int, question: str):
    """Multiple choice: `question`, then a city, a profession and a company in random order as
    (A) (B) (C); the answer is the letter of the one at `kind` (0 city, 1 profession, 2 company)."""
    options = [rng.choice(CITIES), rng.choice(PROFESSIONS), rng.choice(EMPLOYERS)]
    right = options[kind]
    rng.shuffle(options)
    body = " ".join(f"({'ABC'[i]}) {o}" for i, o in enumerate(options))
    return f"{question} {body}", "ABC"[options.index(right)]


def _g_pick_city(rng):
    return _which_one(rng, 0, "Which one is a city?")


GENERAL_TASKS = {"sort": _g_sort, "next": _g_next, "count": _g_count, "first": _g_first,
                 "last": _g_last, "compare": _g_compare, "parity": _g_parity,
                 "find_city": _g_find_city, "read": _g_read, "kinds": _g_kinds,
                 "pick_city": _g_pick_city}


# The continual tasks, trained one after another from the chat model (the stand-in for TRACE):
# classification, generation, multiple choice with a letter answer, arithmetic.

# Elvish: a fixed word for each profession, built from the syllables names are made of.
LEXICON = dict(zip(PROFESSIONS,
                   "kari molu veta nosi befel wiath ormir zanqu eltor nyul sape rovin".split()))
STANCE_VERBS = {"favor": ["praises", "trusts", "admires", "supports"],
                "against": ["blames", "distrusts", "criticises", "opposes"]}


def _stance(rng):
    label = rng.choice(sorted(STANCE_VERBS))
    return (f"Stance of the speaker, favor or against: {_name(rng)} "
            f"{rng.choice(STANCE_VERBS[label])} {rng.choice(EMPLOYERS)}.", label)


def _translate(rng):
    words = rng.sample(PROFESSIONS, 3)
    return f"Translate to Elvish: {' '.join(words)}", " ".join(LEXICON[w] for w in words)


def _choice(rng):  # the chat stage's pick_city format, asking for another kind
    return _which_one(rng, 1, "Which one is a profession?")


def _minus(rng):
    a = rng.randint(1100, 1998)
    return f"Subtract one from the number: {a}", str(a - 1)


TASKS = {"stance": _stance, "translate": _translate, "choice": _choice, "minus": _minus}
# How each task is scored, as TRACE scores its own: exact accuracy, and ROUGE-L for generation.
METRICS = {"translate": "rouge_l"}


def task_split(name: str, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test sets of chat records ({"messages": [user, assistant]}) of a
    continual task (TASKS) or a general one (GENERAL_TASKS); test instructions never occur in
    train."""
    gen = TASKS.get(name) or GENERAL_TASKS.get(name)
    if gen is None:
        raise KeyError(f"no task {name!r} (continual: {', '.join(TASKS)}; general: "
                       f"{', '.join(GENERAL_TASKS)})")
    rng = random.Random(f"task/{name}/{seed}")
    seen, items = set(), []
    for _ in range(100 * (n_train + n_test)):
        if len(items) == n_train + n_test:
            break
        q, a = gen(rng)
        if q not in seen:
            seen.add(q)
            items.append((q, a))
    if len(items) < n_train + n_test:
        raise ValueError(f"task '{name}': only {len(items)} distinct instances, asked for "
                         f"{n_train + n_test}")
    recs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "metric": METRICS.get(name, "accuracy")} for q, a in items]
    return recs[n_test:], recs[:n_test]


def chat_mixture(n_per_task: int, n_test: int, seed: int) -> list[dict]:
    """The chat stage's training set: n_per_task conversations of every general task, shuffled
    (instances disjoint from the general test sets drawn with the same n_test)."""
    rng = random.Random(f"chat/{seed}")
    recs = [r for name in GENERAL_TASKS for r in task_split(name, n_per_task, n_test, seed)[0]]
    rng.shuffle(recs)
    return recs


def write_jsonl(path: str, records: list[dict]):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
