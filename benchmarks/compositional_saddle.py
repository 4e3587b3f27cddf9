"""Why relation_swap stays at chance (issue 14): a contrastive saddle, and the experiment that shows it.

    python benchmarks/compositional_saddle.py                     # contrastive + hard negatives
    python benchmarks/compositional_saddle.py --seed-steps 300    # + 300 steps of a left-colour head
    python benchmarks/compositional_saddle.py --no-hard-negatives --seed-steps 300
    python benchmarks/compositional_saddle.py --model clipscale-tiny-sincos   # the demo's model
    python benchmarks/compositional_saddle.py --model clipscale-tiny-sincos --mirror-pairs  # the demo
    python benchmarks/compositional_saddle.py --demo-items --seed 1   # the demo's items and model

The tiny model on the two-object scenes of clipscale.data.scenes, trained the way
`+experiment=demo_compositional` trains it (captions: 2/3 relation, 1/3 negation; foils:
attribute_swap and one relation_swap; AdamW 1e-3, 20 warm-up steps, cosine, clip 1.0, batch 128),
but without Lightning and on scenes rendered once up front, so one variant takes minutes on a CPU.
It prints the probe's per-type accuracy every `--eval-every` steps.

`--seed-steps K` adds, for the first K steps only, a cross-entropy head that reads the colour of
the left-hand object from the image embedding. It is a diagnostic, not a recipe: it gives the image
tower the left/right binding that contrastive training alone never starts to build. Each tower learns
that binding on its own within ~100 supervised steps, but under the contrastive loss each one's
gradient towards it is proportional to how much of it the other tower already has, and at
initialisation both have almost none. Fixed 2-D sin-cos patch positions in the image tower
(`--model clipscale-tiny-sincos`) give it a start, but whether and when training leaves the saddle
then depends on the seed. `--mirror-pairs` makes half of each batch the mirror images of the other
half, with their mirrored relation captions and their own foils (`data.mirror_pairs`).
`--demo-items` trains instead on the items `+experiment=demo_compositional` trains on (its
SyntheticDataModule's train split: 20,000 scenes and their mirrors, each scene's caption and foils
fixed), in a seeded shuffle each epoch, with the model initialised from `--seed`: the CLI run
without Lightning.
See benchmarks/RESULTS.md for the measured runs.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from open_clip.constants import OPENAI_DATASET_MEAN as MEAN
from open_clip.constants import OPENAI_DATASET_STD as STD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipscale.data import probe, scenes  # noqa: E402
from clipscale.data.synthetic import SyntheticDataModule  # noqa: E402
from clipscale.eval.compositional import evaluate_compositional  # noqa: E402
from clipscale.losses import ClipLoss  # noqa: E402
from clipscale.models import (  # noqa: E402
    build_model,
    build_tokenizer,
    build_transforms,
    normalize_images,
)
from clipscale.module import MAX_LOGIT_SCALE  # noqa: E402
from clipscale.optim import parameter_groups, warmup_cosine  # noqa: E402

MODEL = "clipscale-tiny"
DEMO_RECIPE = OmegaConf.load(
    Path(__file__).resolve().parents[1] / "configs/experiment/demo_compositional.yaml"
)
COLOURS = list(scenes.COLOURS)


def render_training_scenes(model: str, count: int, seed: int) -> dict[str, torch.Tensor]:
    """Scenes with a relation caption, a negation caption, their foils and the left colour."""
    transform = build_transforms(model, is_train=True, as_uint8=True)
    tokenize = build_tokenizer(model)
    images, captions, foils, left, mirror_captions, mirror_foils = [], [], [], [], [], []
    for index in range(count):
        rng = random.Random(f"{seed}/train/{index}/two")
        scene = scenes.draw_scene(rng)
        image = scenes.render_scene(scene, rng)
        relation, negation = scenes.true_relation(scene, rng), scenes.true_negation(scene, rng)
        torch.manual_seed(zlib.crc32(f"{seed}/train/{index}".encode()))
        images.append(transform(image))
        captions += [relation.text(), negation.text()]
        foils += [
            scenes.make_foil(kind, scene, relation, rng).text() for kind in scenes.FOIL_TYPES[:2]
        ]
        left.append([COLOURS.index(scene.left.colour), COLOURS.index(scene.right.colour)])
        mirror, mirrored = scene.mirrored(), relation.mirrored()
        mirror_captions.append(mirrored.text())
        mirror_foils += [
            scenes.make_foil(kind, mirror, mirrored, rng).text() for kind in scenes.FOIL_TYPES[:2]
        ]
    return {
        "images": torch.stack(images),  # uint8 [n, 3, 32, 32]
        "captions": tokenize(captions).view(count, 2, -1),  # relation, negation
        "foils": tokenize(foils).view(count, 2, -1),  # attribute_swap, relation_swap
        "left_colour": torch.tensor(left),  # [n, 2]: the left colour, and the mirror's
        "mirror_captions": tokenize(mirror_captions),  # the relation caption, side reversed
        "mirror_foils": tokenize(mirror_foils).view(count, 2, -1),
    }


def harness_batch(train: dict, args, draw: torch.Generator) -> tuple:
    """(uint8 images, texts, left colours, foil tokens [B, 2, L], foil mask [B, 2]) of one step."""
    scenes = args.batch // 2 if args.mirror_pairs else args.batch
    rows = torch.randint(args.samples, (scenes,), generator=draw)
    negation = torch.rand(scenes, generator=draw) < 1 / 3
    texts, images = train["captions"][rows, negation.long()], train["images"][rows]
    left_colour = train["left_colour"][rows, 0]
    foil_tokens = train["foils"][rows]
    if args.mirror_pairs:  # the mirrors always carry a relation caption
        texts = torch.cat([texts, train["mirror_captions"][rows]])
        images = torch.cat([images, images.flip(-1)])
        left_colour = torch.cat([left_colour, train["left_colour"][rows, 1]])
        foil_tokens = torch.cat([foil_tokens, train["mirror_foils"][rows]])
        negation = torch.cat([negation, torch.zeros_like(negation)])
    # foils apply to relation captions only
    return texts, images, left_colour, foil_tokens, (~negation)[:, None].expand(-1, 2)


def demo_items(model: str, scenes: int, seed: int, hard_negatives: bool) -> dict:
    """The demo recipe's training items (mirror pairs), stacked: every tensor [scenes, 2, ...].

    The data keys come from the recipe itself, so the items follow it if it changes.
    """
    data = DEMO_RECIPE.data
    module = SyntheticDataModule(
        model,
        train_samples=2 * scenes,
        seed=seed,
        objects=data.objects,
        hard_negatives=list(data.hard_negatives) if hard_negatives else None,
        max_hard_negatives=data.max_hard_negatives,
        mirror_pairs=data.mirror_pairs,
    )
    items = module.dataset("train")
    items = [items[index] for index in range(len(items))]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", help="clipscale-tiny (default) or clipscale-tiny-sincos (default: --demo-items)"
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed-steps", type=int, default=0, help="steps with the left-colour head")
    parser.add_argument("--no-hard-negatives", action="store_true")
    parser.add_argument("--mirror-pairs", action="store_true", help="each scene + its mirror")
    parser.add_argument("--demo-items", action="store_true", help="the demo recipe's own items")
    parser.add_argument("--samples", type=int, default=20000, help="training scenes rendered")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.demo_items and (args.seed_steps or args.mirror_pairs):
        parser.error("--demo-items trains on the demo's mirror pairs, without the left-colour head")
    args.model = args.model or (DEMO_RECIPE.model.name if args.demo_items else MODEL)

    # Rendering reseeds torch for each scene's crop, so the harness's model starts from the last
    # scene's seed (kept: runs print what they always did). The data module forks the RNG instead,
    # so with --demo-items the model starts from --seed.
    torch.manual_seed(args.seed)
    if args.demo_items:
        train = demo_items(args.model, args.samples, args.seed, not args.no_hard_negatives)
        epoch = torch.empty(0, dtype=torch.long)  # scene order, drawn afresh each epoch
    else:
        train = render_training_scenes(args.model, args.samples, args.seed)
    probe_dir = probe.builtin_probe_dir()  # the probe training scores (500 per type)
    eval_transform, tokenizer = build_transforms(args.model, False), build_tokenizer(args.model)
    model = build_model(args.model)
    head = torch.nn.Linear(model.text_projection.shape[1], len(COLOURS))
    groups = parameter_groups(model, 0.1) + [{"params": head.parameters(), "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(20, args.steps))
    loss_fn = ClipLoss(gather=False)
    draw = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if args.demo_items:  # 64 scenes + their mirrors, with the CLI's captions and foils
            if epoch.numel() < args.batch // 2:
                epoch = torch.randperm(args.samples, generator=draw)
            rows, epoch = epoch[: args.batch // 2], epoch[args.batch // 2 :]
            batch = {key: value[rows].flatten(0, 1) for key, value in train.items()}
            texts, images, left_colour = batch["texts"], batch["images"], None
            foil_tokens, foil_mask = batch.get("foil_texts"), batch.get("foil_mask")
        else:
            texts, images, left_colour, foil_tokens, foil_mask = harness_batch(train, args, draw)
        if images.dtype == torch.uint8:
            images = normalize_images(images, MEAN, STD)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        foils = None
        if not args.no_hard_negatives:
            foil_features = F.normalize(model.encode_text(foil_tokens.flatten(0, 1)), dim=-1)
            foils = (foil_features.view(*foil_tokens.shape[:2], -1), foil_mask)
        text_features = F.normalize(model.encode_text(texts), dim=-1)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp(), foils=foils)
        if step <= args.seed_steps:
            loss = loss + F.cross_entropy(head(image_features), left_colour)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            metrics = evaluate_compositional(model, tokenizer, eval_transform, probe_dir, 500)
            model.train()
            scores = {kind: round(metrics[kind], 3) for kind in scenes.FOIL_TYPES}
            print(
                f"step {step:5d}  loss {loss.item():.3f}  {scores}  {time.perf_counter() - start:.0f} s"
            )


if __name__ == "__main__":
    main()
