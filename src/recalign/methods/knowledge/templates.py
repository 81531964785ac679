"""Natural-language templates of the recommendation-knowledge tasks (Cao et al., NAACL Findings 2024).

Every task has several phrasings; a generator picks one per example with a seeded generator, so that the
model learns the task rather than one sentence, while the same seed always gives the same data. Every
prompt ends with ``"Answer:"``: the answer is what follows it, and the scorer / SFT collator never has to
guess where the response starts (one of the reference code's pitfalls, DESIGN.md section 6).

The phrasings are registered in the project's one template registry,
:data:`recalign.lm.prompts.TASK_TEMPLATES`, as tasks ``knowledge_<task>`` (e.g. ``knowledge_mim``), and
rendered from there. Placeholders: ``{nouns}`` / ``{noun}`` / ``{past}`` / ``{verb}`` (e.g. "movies" / "movie" /
"watched" / "watch", so one set of templates serves any domain), ``{history}`` (item titles joined by :data:`SEP`), ``{candidates}``, ``{option_a}``,
``{option_b}``, ``{title}``. Prompts are kept short on purpose: on CPU every prompt token costs.
"""

from __future__ import annotations

from recalign.lm.prompts import TASK_TEMPLATES, PromptTemplate, get_templates, register_template

#: Separator between titles in a list. Titles may contain commas ("Usual Suspects, The (1995)"),
#: so a semicolon keeps the list unambiguous.
SEP = "; "

#: The token that stands for a hidden item (MIM) or hidden word (MLM).
MASK = "[MASK]"

TEMPLATES: dict[str, tuple[str, ...]] = {
    # Masked item modelling: one item of the history is hidden; the answer is its title.
    "mim": (
        "A user {past} these {nouns} in order: {history}. Which {noun} is hidden behind "
        + MASK
        + "? Answer:",
        "History with one {noun} masked: {history}. Name the masked {noun}. Answer:",
        "Fill in the missing {noun} (" + MASK + ") in this sequence: {history}. Answer:",
    ),
    # Masked language modelling: words of the history's titles are hidden; the answer lists them in order.
    "mlm": (
        "Some words in these {noun} titles are masked: {history}. Which words are masked, in order? Answer:",
        "Fill in each " + MASK + " in the titles: {history}. Answer:",
    ),
    # BPR as a question: the taken item against one the user never took; the answer is the taken one.
    "bpr": (
        "A user {past}: {history}. Which will they {verb} next: {option_a} or {option_b}? Answer:",
        "History: {history}. Of {option_a} and {option_b}, which {noun} does the user prefer? Answer:",
    ),
    # Retrieval: name the next item, no candidates; grounded to the catalogue at evaluation.
    "retrieval": (
        "A user {past}: {history}. Which {noun} will the user {verb} next? Answer:",
        "Given the {nouns} {history}, recommend the next {noun}. Answer:",
        "History: {history}. Predict the next {noun}. Answer:",
    ),
    # Ranking: order the candidates by likelihood; the answer is the top one (the target).
    "ranking": (
        "A user {past}: {history}. Rank these candidates and give the most likely next one: "
        "{candidates}. Answer:",
        "History: {history}. Candidates: {candidates}. Which candidate will the user choose? Answer:",
    ),
    # Rating prediction: the history carries its ratings; the answer is one digit 1-5.
    "rating": (
        "A user rated: {history}. How many stars (1-5) will they give {title}? Answer:",
        "Ratings so far: {history}. Predict the rating (1-5) of {title}. Answer:",
    ),
}

#: Auxiliary (knowledge) tasks and recommendation tasks, as in the paper.
AUX_TASKS = ("mim", "mlm", "bpr")
REC_TASKS = ("retrieval", "ranking", "rating")
ALL_TASKS = AUX_TASKS + REC_TASKS


#: Name under which a task's phrasings are registered in :data:`recalign.lm.prompts.TASK_TEMPLATES`.
def registry_name(task: str) -> str:
    return f"knowledge_{task}"


def _register() -> None:
    """Put the phrasings in the project's one template registry (which also checks the answer marker)."""
    for task, texts in TEMPLATES.items():
        have = {t.name for t in TASK_TEMPLATES.get(registry_name(task), [])}
        for k, text in enumerate(texts):
            name = f"{task}_{k}"
            if name not in have:
                register_template(registry_name(task), PromptTemplate(name=name, text=text))


_register()


def render(task: str, template: int, **fields: str) -> str:
    """The prompt of ``task`` with phrasing number ``template`` filled in."""
    return get_templates(registry_name(task))[template].text.format(**fields)


def n_templates(task: str) -> int:
    return len(get_templates(registry_name(task)))
