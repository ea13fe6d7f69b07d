"""Prompt sources for SmolLM2's imitation data beyond the topic templates (issue 22): real prompts vary in form
far more than in topic, so these vary the form. All offline and deterministic from their seed.

- ``forms``: everyday request forms, each from its own small generator: code to explain, fix or extend (short
  Python functions written here, some with a planted bug), arithmetic word problems (numbers drawn per
  prompt), rewriting (a sentence to make formal, simpler, shorter, ...), translation (phrases into French,
  Spanish, German, Italian), lists, letters and emails (who, to whom, about what), creative writing with a
  constraint, and short multi-turn chats (a first question, a short canned assistant reply, a follow-up).
- ``docstrings``: "summarise / explain this" over the documentation strings of the Python standard library's
  public functions on this machine (text the machine already has), cut to a paragraph or two.
- ``wild`` (held out, never trained on and never used to choose the exit layer): a different method, a
  persona x goal x constraint grammar ("I'm a nurse and I need to ..."), with its own word lists and seed, so
  that neither its sentence frames nor its requests appear in any training split.

Each generator returns items ``{"question" or "messages", "topic", "template"}``: ``topic`` names the source
and kind (``forms/code-fix``), ``template`` the generator's frame index, for the split's statistics.
"""
from __future__ import annotations

import inspect
import random
import re
import textwrap
from typing import Dict, List, Tuple

# ---- forms -----------------------------------------------------------------------------------------------

_FUNCTIONS = (
    ("average", "numbers", "    total = 0\n    for n in numbers:\n        total += n\n    return total / len(numbers)",
     "    total = 0\n    for n in numbers:\n        total += n\n    return total / (len(numbers) - 1)"),
    ("is_even", "n", "    return n % 2 == 0", "    return n % 2 == 1"),
    ("reverse_words", "text", "    return ' '.join(reversed(text.split()))", "    return ' '.join(text.split())"),
    ("count_vowels", "text", "    return sum(1 for c in text.lower() if c in 'aeiou')",
     "    return sum(1 for c in text if c in 'aeiou')"),
    ("largest", "items", "    best = items[0]\n    for x in items:\n        if x > best:\n            best = x\n    return best",
     "    best = 0\n    for x in items:\n        if x > best:\n            best = x\n    return best"),
    ("factorial", "n", "    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
     "    result = 1\n    for i in range(2, n):\n        result *= i\n    return result"),
    ("is_palindrome", "word", "    w = word.lower()\n    return w == w[::-1]", "    return word == word[::-1]"),
    ("celsius_to_fahrenheit", "c", "    return c * 9 / 5 + 32", "    return c * 5 / 9 + 32"),
    ("unique", "items", "    seen = []\n    for x in items:\n        if x not in seen:\n            seen.append(x)\n    return seen",
     "    seen = []\n    for x in items:\n        if x in seen:\n            seen.append(x)\n    return seen"),
    ("word_count", "text", "    counts = {}\n    for w in text.split():\n        counts[w] = counts.get(w, 0) + 1\n    return counts",
     "    counts = {}\n    for w in text.split():\n        counts[w] = 1\n    return counts"),
    ("fizzbuzz", "n", "    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n"
     "    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)",
     "    if n % 3 == 0:\n        return 'Fizz'\n    if n % 5 == 0:\n        return 'Buzz'\n"
     "    if n % 15 == 0:\n        return 'FizzBuzz'\n    return str(n)"),
    ("first_letter_upper", "name", "    return name[:1].upper() + name[1:]", "    return name.upper()"),
)
_CODE_FRAMES = (
    ("code-explain", "Explain what this Python function does:\n\n{code}"),
    ("code-fix", "This Python function has a bug. Find it and fix it:\n\n{buggy}"),
    ("code-test", "Write two simple test cases for this function:\n\n{code}"),
    ("code-rename", "Suggest a better name for this function and explain why:\n\n{code}"),
    ("code-comment", "Add short comments to this code:\n\n{code}"),
    ("code-write", "Write a Python function called {name} that takes {arg}."),
)
_WORD_PROBLEMS = (
    "A shop sells pencils for {a} cents each. How much do {b} pencils cost?",
    "Tom has {a} apples and gives {b} to his friend. How many apples does he have left?",
    "A train travels {a} kilometers in {b} hours. What is its average speed?",
    "There are {a} students and each bus holds {b}. How many buses are needed?",
    "A recipe needs {b} eggs for {a} cookies. How many eggs for {c} cookies?",
    "What is {a} times {b}? Show your steps.",
    "What is {a} plus {b} minus {c}?",
    "If a book has {a} pages and I read {b} pages a day, how many days will it take?",
    "A rectangle is {a} meters long and {b} meters wide. What is its area?",
    "What is {b} percent of {a}?",
)
_SENTENCES = (
    "hey can u send me the report by tomorrow thx", "The meeting has been moved to Thursday at three.",
    "I think maybe we should probably consider going to the park if it does not rain.",
    "our product is the best and everyone should buy it now", "The cat sat on the warm windowsill all afternoon.",
    "Due to unforeseen circumstances, the event is cancelled.", "i dont like this restaurant the food was cold",
    "Please remember to bring your own lunch on Friday.", "The results of the experiment were very surprising.",
    "We are happy to announce that our new store opens next week.",
)
_REWRITES = ("Rewrite this sentence to sound more formal: \"{s}\"", "Make this sentence simpler: \"{s}\"",
             "Fix the grammar and spelling: \"{s}\"", "Rewrite this sentence in a friendly tone: \"{s}\"",
             "Shorten this sentence: \"{s}\"", "Turn this into a question: \"{s}\"")
_PHRASES = ("Where is the train station?", "I would like a cup of coffee, please.", "What time is it?",
            "Thank you for your help.", "The weather is beautiful today.", "How much does this cost?",
            "I am learning to cook.", "See you tomorrow morning.", "My brother lives in a small town.",
            "Can you recommend a good book?")
_LANGUAGES = ("French", "Spanish", "German", "Italian")
_LIST_FRAMES = ("List {n} things to pack for a {trip}.", "Give me {n} ideas for a {event}.",
                "Name {n} healthy snacks for {who}.", "List {n} ways to save energy at {where}.",
                "Give me {n} questions to ask at a {event}.")
_LIST_FILLERS = {"trip": ("beach holiday", "camping weekend", "business trip", "ski trip", "city break"),
                 "event": ("birthday party", "team meeting", "job interview", "school fair", "family reunion"),
                 "who": ("children", "office workers", "runners", "students", "older adults"),
                 "where": ("home", "the office", "school", "a small shop", "a hotel")}
_LETTERS = ("Write a short email to {to} asking {about}.", "Write a polite letter to {to} about {about2}.",
            "Write a text message to {to} to say {say}.")
_LETTER_FILLERS = {
    "to": ("my landlord", "a teacher", "a new colleague", "my neighbor", "a customer", "the city council"),
    "about": ("for a day off", "to reschedule our meeting", "for feedback on my work", "about a late delivery",
              "for a recommendation"),
    "about2": ("a noise problem", "a broken heater", "a missed payment", "a lost package", "a thank-you"),
    "say": ("I will be late", "congratulations on the new job", "thanks for dinner", "the party is cancelled"),
}
_CREATIVE = ("Write a four-line poem about {x} that rhymes.", "Write a story in exactly five sentences about {x}.",
             "Describe {x} without using the letter 'e'.", "Write a short fable about {x} with a moral.",
             "Write a funny product review of {x}.", "Write a diary entry from the point of view of {x}.")
_CREATIVE_FILLERS = ("a lost umbrella", "an old clock", "a brave mouse", "the last day of summer", "a talking tree",
                     "a robot learning to paint", "a city at night", "a grumpy cloud")
_CHATS = (
    ("What is a good houseplant for beginners?", "A snake plant is a good choice: it needs little water and light.",
     "How often should I water it?"),
    ("Can you help me plan a picnic?", "Of course! Where and when would you like to have it?",
     "In a park on Saturday, for four people. What food should I bring?"),
    ("I want to start running.", "Great idea! Start slowly, with short runs two or three times a week.",
     "What shoes should I buy?"),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "What is it known for?"),
    ("Recommend a movie for tonight.", "How about a comedy? 'Paddington 2' is fun for everyone.",
     "Something more serious, please."),
    ("How do I boil an egg?", "Put the egg in boiling water for about 9 minutes for a hard-boiled egg.",
     "And for a soft one?"),
    ("I feel tired every afternoon.", "That is common. Short walks, water and a light lunch can help.",
     "What should a light lunch look like?"),
    ("Can you explain what a budget is?", "A budget is a plan for how you will spend and save your money.",
     "How do I make one?"),
)


def _code_block(name: str, arg: str, body: str) -> str:
    return f"```python\ndef {name}({arg}):\n{body}\n```"


def form_items(seed: int) -> List[dict]:
    """The ``forms`` split: every generator's prompts, shuffled by a generator of their own."""
    rng = random.Random(f"{seed}:forms")
    items: List[dict] = []
    for name, arg, body, buggy in _FUNCTIONS:
        for frame_index, (kind, frame) in enumerate(_CODE_FRAMES):
            question = frame.format(code=_code_block(name, arg, body), buggy=_code_block(name, arg, buggy),
                                    name=name, arg=arg)
            items.append({"question": question, "topic": f"forms/{kind}", "template": frame_index})
    for frame_index, frame in enumerate(_WORD_PROBLEMS):
        for _ in range(8):
            a, b = rng.randint(12, 480), rng.randint(2, 24)
            items.append({"question": frame.format(a=a, b=b, c=rng.randint(2, 90)), "topic": "forms/arithmetic",
                          "template": frame_index})
    for frame_index, frame in enumerate(_REWRITES):
        for sentence in _SENTENCES:
            items.append({"question": frame.format(s=sentence), "topic": "forms/rewrite", "template": frame_index})
    for phrase in _PHRASES:
        for language in _LANGUAGES:
            items.append({"question": f"Translate into {language}: \"{phrase}\"", "topic": "forms/translate",
                          "template": _LANGUAGES.index(language)})
    for frame_index, frame in enumerate(_LIST_FRAMES):
        key = next(k for k in _LIST_FILLERS if "{" + k + "}" in frame)
        for filler in _LIST_FILLERS[key]:
            items.append({"question": frame.format(n=rng.choice((3, 4, 5, 7)), **{key: filler}),
                          "topic": "forms/list", "template": frame_index})
    for frame_index, frame in enumerate(_LETTERS):
        for to in _LETTER_FILLERS["to"]:
            fill = {key: rng.choice(values) for key, values in _LETTER_FILLERS.items() if key != "to"}
            items.append({"question": frame.format(to=to, **fill), "topic": "forms/letter", "template": frame_index})
    for frame_index, frame in enumerate(_CREATIVE):
        for filler in _CREATIVE_FILLERS:
            items.append({"question": frame.format(x=filler), "topic": "forms/creative", "template": frame_index})
    for chat_index, (first, reply, follow_up) in enumerate(_CHATS):
        items.append({"messages": [{"role": "user", "content": first}, {"role": "assistant", "content": reply},
                                   {"role": "user", "content": follow_up}],
                      "topic": "forms/chat", "template": chat_index})
    rng.shuffle(items)
    return items


# ---- docstrings --------------------------------------------------------------------------------------------

_DOC_MODULES = ("json", "os.path", "collections", "itertools", "functools", "string", "textwrap", "random",
                "statistics", "datetime", "shutil", "heapq", "bisect", "math", "re", "csv", "pathlib", "fractions",
                "difflib", "operator", "copy", "pprint", "calendar", "glob", "fnmatch", "tempfile", "hashlib",
                "base64", "uuid", "decimal", "secrets", "urllib.parse", "html", "zipfile", "gzip", "logging",
                "argparse", "dataclasses", "enum", "inspect", "typing", "contextlib", "queue", "threading", "time",
                "locale", "unicodedata", "colorsys", "sched", "shlex", "struct", "weakref", "abc", "numbers")
_DOC_FRAMES = ("Summarise this documentation in two sentences:\n\n{doc}",
               "Explain this to a beginner programmer:\n\n{doc}",
               "What does this function do? Give a short example of using it.\n\n{doc}",
               "Rewrite this documentation in plain English:\n\n{doc}")


def docstring_items(seed: int, limit: int = 600) -> List[dict]:
    """The ``docstrings`` split: public functions' and classes' documentation strings of the standard
    library modules above (what this machine's Python has), 80-700 characters, one frame each."""
    import importlib
    rng = random.Random(f"{seed}:docstrings")
    items: List[dict] = []
    for module_name in _DOC_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            doc = doc.split("\n\n")[0] if len(doc) > 700 else doc
            if not 80 <= len(doc) <= 700:
                continue
            frame_index = rng.randrange(len(_DOC_FRAMES))
            text = f"{module_name}.{name}: " + textwrap.dedent(doc).strip()
            items.append({"question": _DOC_FRAMES[frame_index].format(doc=text), "topic": f"docstrings/{module_name}",
                          "template": frame_index})
    rng.shuffle(items)
    return items[:limit]


# ---- wild (held out) ---------------------------------------------------------------------------------------

_PERSONAS = ("I'm a nurse", "I'm a high school student", "I run a small bakery", "I'm retired", "I'm a new parent",
             "I work in IT support", "I'm a gardener", "I teach piano", "I'm training for a 10k",
             "I'm moving abroad next month", "I just adopted a dog", "I'm a freelance designer")
_GOALS = ("write a message to my team about a schedule change", "plan a cheap dinner for six people",
          "understand why my bread did not rise", "explain compound interest to my nephew",
          "choose between two job offers", "write a short speech for a friend's wedding",
          "organise my week so I have time to exercise", "describe my skills in a cover letter",
          "fix a Python loop that never ends", "make a packing list for a rainy weekend away",
          "answer a customer who is angry about a late order", "learn ten useful words in Portuguese",
          "figure out how many tiles I need for a 3 by 4 meter floor", "start a vegetable garden on my balcony",
          "summarise a long article for my manager", "come up with a name for a podcast about cooking")
_CONSTRAINTS = ("", " Keep it under 80 words.", " Use bullet points.", " Please be brief.",
                " Explain it step by step.", " Give me two options.")
_WILD_FRAMES = ("{persona} and I need to {goal}. Can you help?{constraint}",
                "{persona}. How do I {goal}?{constraint}",
                "Quick question: {persona} and want to {goal}.{constraint}")


def wild_items(seed: int, count: int = 96) -> List[dict]:
    """The held-out ``wild`` split: ``count`` distinct persona x goal x constraint requests, its own seed."""
    rng = random.Random(f"{seed}:wild")
    seen, items = set(), []
    while len(items) < count:
        persona, goal = rng.randrange(len(_PERSONAS)), rng.randrange(len(_GOALS))
        if (persona, goal) in seen:
            continue
        seen.add((persona, goal))
        frame = rng.randrange(len(_WILD_FRAMES))
        question = _WILD_FRAMES[frame].format(persona=_PERSONAS[persona], goal=_GOALS[goal],
                                              constraint=rng.choice(_CONSTRAINTS))
        items.append({"question": question, "topic": f"wild/{_GOALS[goal]}", "template": frame})
    return items


SOURCES: Dict[str, object] = {"forms": form_items, "docstrings": docstring_items, "wild": wild_items}


# ---- self_instruct: the model writes the requests ----------------------------------------------------------

_SELF_CATEGORIES = ("cooking", "travel", "work and careers", "health and fitness", "money and budgeting",
                    "friends and family", "computers and phones", "school and studying", "hobbies", "home repair",
                    "pets", "shopping", "science", "history", "writing", "the weather", "music", "sports",
                    "gardening", "cars and driving")
_SELF_FORMS = ("a short question", "a request to write something short", "a request for advice",
               "a request to explain a concept simply", "a request for a list", "a how-to question")
SELF_INSTRUCT_PER_PAIR = 3
_SELF_CATEGORIES_2 = ("parenting", "weddings and parties", "moving house", "job interviews", "small business",
                      "language learning", "cleaning and laundry", "sleep", "mental wellbeing", "photography",
                      "board games", "reading and books", "films and TV", "camping and hiking", "cycling",
                      "public speaking", "email and messages", "taxes and paperwork", "neighbours",
                      "volunteering", "baking", "coffee and tea", "art and drawing", "first aid",
                      "time management", "spreadsheets", "programming", "math homework", "the environment",
                      "road trips")
_SELF_FORMS_2 = ("a request that says who the writer is and what they need", "a request to write a message or email",
                 "a request to compare two options", "a request to plan something step by step")
SELF_INSTRUCT_PER_PAIR_2 = 2


_SELF_EXAMPLES = ("How do I get a red wine stain out of a carpet?", "Write a short birthday message for my aunt.",
                  "What should I pack for a two-day hiking trip?", "Explain what inflation is in simple words.",
                  "Give me three ideas for a rainy Sunday with kids.", "Can you check this sentence for mistakes: "
                  "'Me and him goes to school every days.'", "Why does bread go stale?",
                  "Help me write a polite email to cancel a dentist appointment.")
_SELF_EXAMPLES_2 = ("My daughter starts school next week. How can I help her feel less nervous?",
                    "I have a job interview on Friday. What questions should I prepare for?",
                    "Compare renting and buying a flat for someone who moves every few years.",
                    "Write a short note to my neighbour asking them to water my plants while I'm away.",
                    "Plan a simple three-day workout routine for a beginner.",
                    "Our team missed a deadline. How do I tell the client without losing them?",
                    "What is the difference between baking soda and baking powder?",
                    "Turn these notes into a friendly reminder: meeting Tuesday 10am, bring laptops.")
_SELF_CATEGORIES_3 = ("grandparents", "roommates", "weddings speeches", "customer service", "online shopping",
                      "renting a flat", "car repairs", "bicycles", "recipes for kids", "vegetarian food",
                      "birthday gifts", "job applications", "team meetings", "small talk", "saving for a holiday",
                      "a new puppy", "houseplants", "knitting and sewing", "video games", "learning guitar",
                      "running a club", "school projects", "science fairs", "writing poems", "choosing a laptop",
                      "smartphone settings", "passwords and safety", "recycling", "allergies", "staying motivated")
_SELF_EXAMPLES_3 = ("I just started a new job in a warehouse. How do I avoid back pain?",
                    "Write a two-line caption for a photo of my grandmother's garden.",
                    "My landlord wants to raise the rent. What should I say to him?",
                    "Explain how a refrigerator keeps food cold, for a ten-year-old.",
                    "Give me five questions to ask when buying a used car.",
                    "I'm organising a quiz night for our club. Suggest six categories.")
_SELF_FORMS_4 = ("a request that says how long or in what shape the answer should be",
                 "a request to rewrite, shorten or correct a short text it quotes",
                 "a request for help with a problem the writer describes", "a request for a few ideas or suggestions")
_SELF_EXAMPLES_4 = ("In two sentences, what is a credit score?",
                    "Make this sound friendlier: 'Send me the report by noon.'",
                    "My tomato plants have yellow leaves at the bottom. What is wrong and what can I do?",
                    "Give me a few ideas for a cheap team lunch, as a short list.",
                    "I work night shifts. How can I sleep better during the day? Keep it short.",
                    "Shorten this for a text message: 'I will be a little late to dinner tonight because of traffic.'",
                    "Suggest three names for a book club that meets in a cafe.",
                    "Explain what a mortgage is in one paragraph, without jargon.")
_SELF_FORMS_5 = ("a request where the writer says what their job or situation is and asks for help with a task",
                 "a request that ends with an instruction about the answer: its length, bullet points, steps "
                 "or options",
                 "a quick question about something the writer wants to do or make")
_SELF_EXAMPLES_5 = ("I drive a bus on early shifts. How can I eat better when I'm always in a hurry?",
                    "I coach a children's football team. Write a short message telling the parents that "
                    "Saturday's match is cancelled.",
                    "I'm a chef and my kitchen is too hot in summer. What can I change? Use bullet points.",
                    "I manage a small shoe shop and a customer left a bad review. How should I reply? Keep it short.",
                    "I'm learning JavaScript. Explain what a function is, step by step.",
                    "I volunteer at the library. Can you help me write a poster for our reading club?",
                    "How do I make a simple budget in a spreadsheet? Give me two ways.",
                    "I'm a carpenter. How much paint do I need for a 20 square meter wall? Please be brief.")
_SELF_FORMS_6 = ("a request where the writer describes their situation in a sentence or two and then asks a question",
                 "a request for help writing something for a particular person or occasion",
                 "a how-to request that mentions a limit the writer has, such as time, money or skill")
_SELF_EXAMPLES_6 = ("My brother is turning forty and loves fishing. What could I write in his card?",
                    "We have a leak under the kitchen sink and the plumber can't come until Monday. "
                    "What can I do until then?",
                    "I only have twenty minutes in the morning. How can I make a healthy breakfast?",
                    "Help me write a short thank-you note to the nurses who looked after my father.",
                    "I'm not good with tools. How do I hang a heavy mirror safely?",
                    "Our choir is singing at a care home next week. Write a few words to introduce us.",
                    "I've never cooked fish before. How do I bake salmon without drying it out?",
                    "My landlady is eighty and lives alone. What could I offer to help her with this winter?")
_SELF_FORMS_7 = ("a request to explain the difference between two things people often mix up",
                 "a request that gives a few details, such as names, numbers or dates, and asks for a short text "
                 "using them",
                 "a question asking what to do first about a problem, written in a hurry")
_SELF_EXAMPLES_7 = ("What's the difference between a cold and the flu?",
                    "Write an invitation: Sam's 7th birthday, Saturday 14 June, 2pm, at the park by the lake.",
                    "My phone fell in water, what do I do first??",
                    "Explain the difference between weather and climate in a few sentences.",
                    "Use these in a short notice: office closed Friday, reopens Monday 8am, call Tom for urgent "
                    "things.",
                    "Car won't start and I have to leave in 10 minutes. What should I check first?",
                    "Is there a difference between 'affect' and 'effect'?",
                    "Make a short shopping list for pancakes for four people.")
_SELF_FORMS_8 = ("a request that lists the writer's options, ingredients or things at hand and asks which to choose "
                 "or how to use them",
                 "a request for a short example or template the writer can copy and fill in",
                 "a follow-up question that starts with what the writer already tried")
_SELF_EXAMPLES_8 = ("I have eggs, spinach and some cheese. What can I make for lunch?",
                    "Give me a template for a weekly chore chart for three flatmates.",
                    "I already restarted my router twice and the wifi is still slow. What else can I try?",
                    "Show me an example of a polite reminder about an unpaid invoice.",
                    "Should I learn Spanish, French or Italian first if I travel a lot in Europe?",
                    "I tried soaking the pan overnight but the burnt bits won't come off. Any other tricks?",
                    "Give me a sample agenda for a thirty-minute parent-teacher meeting.",
                    "I've got a free Saturday, a bike and twenty pounds. What could I do?")
# (tag, categories, forms, copies per pair, few-shot pool): round 1 (no tag), then r2 (more categories and
# forms: the first round's 360 requests gave 225 usable ones, too few to move the drafter off the topic
# templates; its pool also shows requests that say who the sender is, as people write them), then r3 (30
# more categories), then r4 (four more forms: the answer's length or shape asked for, a quoted text to rewrite, a
# described problem, ideas; its own pool), then r5 (three forms in which the writer says who they are or
# how the answer should look, as chat users write; its own pool, none of whose people or tasks is a wild one),
# then r6 (a described situation, something to write for someone, a how-to with the writer's limit; its pool),
# then r7 (two things mixed up, a short text from given details, what to do first in a hurry; its pool), then
# r8 (choosing among or using what the writer lists, an example or template to fill in, a follow-up after what
# the writer already tried; its pool).
_SELF_ROUNDS = (
    ("", _SELF_CATEGORIES, _SELF_FORMS, SELF_INSTRUCT_PER_PAIR, _SELF_EXAMPLES),
    ("r2", _SELF_CATEGORIES + _SELF_CATEGORIES_2, _SELF_FORMS + _SELF_FORMS_2, SELF_INSTRUCT_PER_PAIR_2,
     _SELF_EXAMPLES + _SELF_EXAMPLES_2),
    ("r3", _SELF_CATEGORIES_3 + _SELF_CATEGORIES_2 + _SELF_CATEGORIES, _SELF_FORMS_2 + _SELF_FORMS, 1,
     _SELF_EXAMPLES_2 + _SELF_EXAMPLES_3),
    ("r4", _SELF_CATEGORIES + _SELF_CATEGORIES_2 + _SELF_CATEGORIES_3, _SELF_FORMS_4, 2,
     _SELF_EXAMPLES_4 + _SELF_EXAMPLES_3),
    ("r5", _SELF_CATEGORIES_2 + _SELF_CATEGORIES_3 + _SELF_CATEGORIES, _SELF_FORMS_5, 2,
     _SELF_EXAMPLES_5 + _SELF_EXAMPLES_2),
    ("r6", _SELF_CATEGORIES_3 + _SELF_CATEGORIES + _SELF_CATEGORIES_2, _SELF_FORMS_6, 2,
     _SELF_EXAMPLES_6 + _SELF_EXAMPLES_4),
    ("r7", _SELF_CATEGORIES + _SELF_CATEGORIES_3 + _SELF_CATEGORIES_2, _SELF_FORMS_7, 2,
     _SELF_EXAMPLES_7 + _SELF_EXAMPLES_6),
    ("r8", _SELF_CATEGORIES_2 + _SELF_CATEGORIES + _SELF_CATEGORIES_3, _SELF_FORMS_8, 2,
     _SELF_EXAMPLES_8 + _SELF_EXAMPLES_5),
)


def self_instruct_forms() -> Tuple[str, ...]:
    """Every round's forms, each once, in the order the rounds first ask for them: a usable request's
    ``template`` is its form's index here (a later round only appends)."""
    return tuple(dict.fromkeys(form for _, _, forms, _, _ in _SELF_ROUNDS for form in forms))


def self_instruct_round_names() -> Tuple[str, ...]:
    """Every round's name, in order: its tag, "r1" for the first round (untagged)."""
    return tuple(tag or "r1" for tag, *_ in _SELF_ROUNDS)


def self_instruct_round(key: str) -> str:
    """The round that asked for a request, from its key (one of ``self_instruct_round_names()``)."""
    copy = key.split("|")[2]
    return copy.split(".")[0] if "." in copy else "r1"


def self_instruct_requests(seed: int) -> List[dict]:
    """What the model continues, one request per (category, form, copy), each with its own sampling seed:
    ``{"key", "seed", "category", "form", "text"}``. Self-instruct's form: a numbered list of three example
    user messages (drawn per request from a fixed pool, none about the category), then the next number with
    the category and form asked for; the model's first line is the new request."""
    requests = []
    for tag, categories, forms, copies, pool in _SELF_ROUNDS:
        # each round its own random stream: a later round never moves an earlier one's requests (cached)
        rng = random.Random(f"{seed}:self_instruct" + (f":{tag[1:]}" if tag else ""))
        for category in categories:
            for form in forms:
                for copy in range(copies):
                    examples = rng.sample(pool, 3)
                    text = ("Messages that people sent to a helpful assistant, one per line:\n"
                            + "".join(f"{i + 1}. {example}\n" for i, example in enumerate(examples))
                            + f"4. ({category}, {form})")
                    requests.append({"key": f"{category}|{form}|{tag + '.' if tag else ''}{copy}",
                                     "seed": rng.randrange(2 ** 31), "category": category, "form": form,
                                     "text": text})
    return requests


_META = ("sure", "here", "i'm here", "i am here", "i can", "as an", "as a", "a person", "you could", "you can",
         "i would", "i'd be happy", "i'm an ai", "a request", "dear", "certainly", "of course", "messages", "(",
         "note", "example", "however", "you're looking", "you are looking", "these are", "the above",
         "you're given", "you are given", "*", "#")


def clean_instruction(text: str) -> str:
    """The first line of what the model wrote (its list number, if it numbered the line, and quotes taken
    off); "" when it is not a usable request: too short or long, or it talks about the task instead of doing
    it (meta openings, the category-and-form parenthesis copied, a mention of the assistant)."""
    line = next((part.strip() for part in text.strip().splitlines() if part.strip()), "")
    line = re.sub(r"^(\d+\.\s*)+", "", line).strip().strip('"').strip("'").strip()
    lowered = line.lower()
    if not 15 <= len(line) <= 200 or lowered.startswith(_META) or "assistant" in lowered or "ai" in lowered.split():
        return ""
    return line


def self_instruct_items(written: Dict[str, str]) -> List[dict]:
    """The ``self_instruct`` split from the model's written requests (``key -> text``): cleaned, distinct,
    in the requests' order."""
    items, seen, forms = [], set(), self_instruct_forms()
    for key in sorted(written):
        line = clean_instruction(written[key])
        if line and line.lower() not in seen:
            seen.add(line.lower())
            category, form, _ = key.split("|")
            items.append({"question": line, "topic": f"self_instruct/{category}",
                          "template": forms.index(form)})
    return items
