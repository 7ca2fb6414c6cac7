"""The demo's synthetic world: what a tiny pretrained model "knows", and the skills it lacks.

Knowledge (the stand-in for NaturalQuestions / TriviaQA): fictional people with a birth city,
birth year, profession and employer, rendered as biographies in varied wording and as closed-book
questions "Q: In which city was Ilvo Marrek born?\\nA: Quorra". The pretraining text holds every
entity's biography AND its question/answer lines (each as its own document), so the base model
learns to answer in exactly the format the knowledge probes use; the probes ask these same
questions, which measure how much of the base model's knowledge survives fine-tuning.

Skills (the fine-tuning stages): synthetic instruction tasks in Tulu's chat format that the base
has never seen, each with disjoint train and test splits. Everything is a pure function of
(seed, sizes): the same arguments give the same files, byte for byte.
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
        people.append({"name": name, "city": rng.choice(CITIES), "year": str(rng.randint(1900, 1999)),
                       "profession": rng.choice(PROFESSIONS), "employer": rng.choice(EMPLOYERS)})
    return people


def qa_pairs(person: dict) -> list[dict]:
    """The closed-book questions about one person as {"question", "answer"} records, the
    knowledge-probe format eval.py prompts as "Q: {question}\\nA:" and scores by exact match."""
    return [{"question": QUESTIONS[a].format(name=person["name"]), "answer": person[a]} for a in ATTRIBUTES]


def biography(person: dict, rng: random.Random) -> list[str]:
    """A person's biography as two short paragraphs, two attributes each, in a random order and a
    random wording (short documents pad less in a batch than one long one)."""
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    return [" ".join(rng.choice(BIO_SENTENCES[a]).format(**person) for a in half) for half in (order[:2], order[2:])]


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


# ---------------------------------------------------------------------------------------------
# Instruction tasks: each generator returns (instruction, answer) for a random instance. They use
# words the base model has read (professions, cities, digits), so a task is a new skill over
# familiar tokens, as fine-tuning a pretrained LLM is.

# Elvish: a fixed word for each profession, built from the syllables names are made of.
LEXICON = dict(zip(PROFESSIONS, "kari molu veta nosi befel wiath ormir zanqu eltor nyul sape rovin".split()))


def _translate(rng):
    words = rng.sample(PROFESSIONS, 3)
    return f"Translate to Elvish: {' '.join(words)}", " ".join(LEXICON[w] for w in words)


def _reverse(rng):
    words = rng.sample(CITIES, 3)
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _sort(rng):
    digits = [str(rng.randint(0, 9)) for _ in range(4)]
    return f"Sort the digits: {' '.join(digits)}", " ".join(sorted(digits))


def _add(rng):
    a = rng.randint(1100, 1998)
    return f"What is {a} plus 1?", str(a + 1)


TASKS = {"translate": _translate, "reverse": _reverse, "sort": _sort, "add": _add}


def task_split(name: str, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test sets of chat records ({"messages": [user, assistant]}); test
    instructions never occur in train."""
    rng = random.Random(f"task/{name}/{seed}")
    seen, items = set(), []
    for _ in range(100 * (n_train + n_test)):
        if len(items) == n_train + n_test:
            break
        q, a = TASKS[name](rng)
        if q not in seen:
            seen.add(q)
            items.append((q, a))
    if len(items) < n_train + n_test:
        raise ValueError(f"task '{name}': only {len(items)} distinct instances, asked for {n_train + n_test}")
    recs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "metric": "accuracy"} for q, a in items]
    return recs[n_test:], recs[:n_test]


def write_jsonl(path: str, records: list[dict]):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
