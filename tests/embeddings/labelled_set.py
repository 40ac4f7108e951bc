"""A small labelled rerank set, written for these tests: each query with documents graded
2 (answers it), 1 (same topic, does not answer) or 0 (unrelated). Used by the rerank tests
and `benchmarks/rerank_ndcg.py` (NDCG@k)."""

from __future__ import annotations

import math

QUERIES: list[tuple[str, list[tuple[str, int]]]] = [
    ("How do I reset a forgotten email password?", [
        ("To reset your password, click 'Forgot password' on the sign-in page and follow the "
         "link sent to your recovery address.", 2),
        ("Strong passwords mix letters, numbers and symbols and are never reused.", 1),
        ("Our office is closed on public holidays.", 0),
        ("The recipe needs two cups of flour and a pinch of salt.", 0),
        ("Email filters sort incoming messages into folders automatically.", 1),
    ]),
    ("What causes the seasons on Earth?", [
        ("Seasons happen because Earth's axis is tilted about 23.4 degrees, so each hemisphere "
         "gets more direct sunlight for part of the year.", 2),
        ("Earth orbits the Sun once every 365.25 days.", 1),
        ("The stock market fell two percent on Tuesday.", 0),
        ("Autumn leaves turn red and orange as chlorophyll breaks down.", 1),
        ("A good espresso needs finely ground beans and high pressure.", 0),
    ]),
    ("Which programming language is used for data analysis with pandas?", [
        ("pandas is a Python library for data manipulation and analysis, built on NumPy.", 2),
        ("Giant pandas eat bamboo for up to fourteen hours a day.", 0),
        ("R is another language popular with statisticians.", 1),
        ("Spreadsheets are often the first tool people use to analyse data.", 1),
        ("The train to the airport leaves every fifteen minutes.", 0),
    ]),
    ("How can I lower my blood pressure naturally?", [
        ("Regular exercise, less salt, limiting alcohol and losing weight all lower blood "
         "pressure.", 2),
        ("Blood pressure is measured in millimetres of mercury.", 1),
        ("The museum's new wing displays modern sculpture.", 0),
        ("Hypertension raises the risk of heart attack and stroke.", 1),
        ("Football season starts in late August.", 0),
    ]),
    ("What is the capital of Australia?", [
        ("Canberra is the capital city of Australia.", 2),
        ("Sydney is Australia's largest city, famous for its opera house.", 1),
        ("Kangaroos are marsupials found only in Australia.", 1),
        ("Photosynthesis converts light into chemical energy.", 0),
        ("Paris is the capital of France.", 0),
    ]),
    ("How do vaccines protect against disease?", [
        ("Vaccines train the immune system to recognise a pathogen, so it responds quickly "
         "when exposed later.", 2),
        ("Antibiotics treat bacterial infections but not viral ones.", 1),
        ("The bakery on the corner sells fresh bread every morning.", 0),
        ("Measles outbreaks have returned where vaccination rates fell.", 1),
        ("Electric cars use batteries instead of petrol engines.", 0),
    ]),
    # Harder: documents that share the query's words but not its meaning.
    ("What animals can I find near Peru?", [
        ("The giant panda (Ailuropoda melanoleuca), also known as the panda bear or simply "
         "panda, is a bear species endemic to China.", 0),
        ("The llama is a domesticated South American camelid, widely used as a meat and pack "
         "animal by Andean cultures since the pre-Columbian era.", 2),
        ("The wild Bactrian camel (Camelus ferus) is an endangered species of camel endemic to "
         "Northwest China and southwestern Mongolia.", 0),
        ("The guanaco is a camelid native to South America, closely related to the llama.", 2),
        ("Lima, the capital of Peru, is known for its ceviche.", 1),
    ]),
    ("Is it safe to eat raw cookie dough?", [
        ("Raw cookie dough can carry E. coli in the flour and salmonella in the eggs, so "
         "eating it is risky.", 2),
        ("Browser cookies store small pieces of data for the websites you visit.", 0),
        ("Bake the cookies at 180 degrees for twelve minutes until golden.", 1),
        ("Food poisoning causes nausea, cramps and fever.", 1),
        ("Pizza dough rises best in a warm kitchen.", 0),
    ]),
    ("How do I stop my Python script from running out of memory?", [
        ("Read the file in chunks or use generators instead of loading every row into a "
         "list.", 2),
        ("Pythons are large non-venomous snakes that kill their prey by constriction.", 0),
        ("Objects kept alive by forgotten references cause memory leaks.", 1),
        ("RAM prices fell sharply last year.", 0),
        ("The script for the school play was printed yesterday.", 0),
    ]),
    ("Why is the sky blue?", [
        ("Air molecules scatter short blue wavelengths of sunlight much more than red ones "
         "(Rayleigh scattering).", 2),
        ("Blue whales are the largest animals known to have lived.", 0),
        ("Sunsets look red because their light crosses more of the atmosphere.", 1),
        ("Feeling blue means feeling sad.", 0),
        ("The sky was clear all weekend.", 0),
    ]),
    ("Apple stock price today", [
        ("Apple Inc. shares rose 3% after strong iPhone sales.", 2),
        ("Apples are rich in fibre and vitamin C.", 0),
        ("Stock broth is made by simmering bones for hours.", 0),
        ("Microsoft shares fell after its earnings report.", 1),
        ("The Nasdaq index tracks technology companies.", 1),
    ]),
]


def dcg(gains: list[int]) -> float:
    return sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(ranked_grades: list[int], all_grades: list[int], k: int) -> float:
    ideal = dcg(sorted(all_grades, reverse=True)[:k])
    return dcg(ranked_grades[:k]) / ideal if ideal else 0.0
