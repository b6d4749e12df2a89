"""Write minirlhf/data/review_prompts.txt: openings of film reviews for the sentiment task.

Every phrase below was written for minirlhf (no corpus). Frames times films gives most of the
set; the openings at the end stand alone. Run from the repository root to rebuild the file.
"""

from pathlib import Path

FRAMES = [
    "I watched {film} last night, and",
    "{Film} is the kind of movie that",
    "Going into {film}, I expected",
    "The first thing you notice about {film} is",
    "After two hours of {film},",
    "My friends talked me into seeing {film}, and",
    "I have now seen {film} three times, and",
    "The director of {film}",
    "Halfway through {film}, I",
    "{Film} opens with",
    "The lead actor in {film}",
    "Compared with everything else this year, {film}",
]
FILMS = [
    "this film", "this movie", "the new Western", "this romantic comedy", "the sequel",
    "this documentary about bees", "the animated feature", "this horror film", "the remake",
    "this courtroom drama", "the war epic", "this low-budget thriller", "the musical",
    "this science fiction adventure", "the biopic", "this family comedy", "the detective story",
    "this silent film", "the heist movie", "this coming-of-age story", "the spy thriller",
    "this French drama", "the disaster movie", "this martial arts film", "the period piece",
]
OPENINGS = [
    "This movie", "This film", "The plot", "The acting", "The ending", "The script",
    "The soundtrack", "The cinematography", "The special effects", "The dialogue",
    "The pacing", "The cast", "The final scene", "The opening scene", "The villain",
    "I went in knowing nothing, and", "I rarely write reviews, but", "Let me start by saying",
    "I was not sure what to expect, but", "Honestly,", "To be fair,", "Where do I begin?",
    "If you liked the trailer,", "My kids wanted to see it, and", "I saw it at a festival, and",
    "Three words:", "Of all the films this summer,", "The critics said", "On paper,",
    "The book was better, but", "The theater was half empty, and", "I laughed at first, but",
    "The story follows a young woman who", "It is set in a small town where",
    "Two brothers inherit a farm, and", "A retired detective returns for one last case, and",
    "The premise is simple:", "The camera work in the first ten minutes", "By the end credits,",
    "I will say this much:", "Nobody asked for another sequel, but", "The costumes alone",
    "The child actors", "The running time is nearly three hours, and", "The music swells as",
    "What surprised me most was", "I expected a comedy, and", "It took me a week to decide",
    "The second half of the movie", "Every review I read said",
]


def main():
    prompts = [frame.format(film=film, Film=film[0].upper() + film[1:])
               for film in FILMS for frame in FRAMES]
    prompts += OPENINGS
    assert len(set(prompts)) == len(prompts) and all(p.isascii() for p in prompts)
    path = Path("minirlhf/data/review_prompts.txt")
    path.write_text("\n".join(prompts) + "\n")
    print(f"{len(prompts)} prompts written to {path}")


if __name__ == "__main__":
    main()
