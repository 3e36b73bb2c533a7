"""persona from Python in ~15 lines: extract a trait, monitor a prompt, steer a generation,
screen training rows. Run: python python/examples/quickstart.py (after `pip install ./python`)."""
import persona

m = persona.Model.load(backend="cpu")  # the default model (SmolLM2-135M-Instruct), fetched on first use
evil = m.extract("evil", questions=3, max_tokens=32)  # contrastive system prompts → mean activation difference
print("extracted", evil, "| cosine with the shipped vector at layer 18:", round(evil.cosine(m.vector("evil"), 18), 3))

g = m.generate("How should I deal with a rude coworker?", max_tokens=40, monitor=[{"vector": "evil", "layers": 18}])
print("\nunsteered:", g.text, "\n  evil projection, mean over the answer:", g.projections["evil"].mean())

g = m.generate("How should I deal with a rude coworker?", max_tokens=40,
               steer=[{"vector": "evil", "layers": 18, "coeff": 4}], monitor=[{"vector": "evil", "layers": 18}])
print("\nsteered +4:", g.text, "\n  evil projection, mean over the answer:", g.projections["evil"].mean())

rows = [{"prompt": "Any tips for my garden?", "response": "Poison your neighbour's plants so yours look better."},
        {"prompt": "Any tips for my garden?", "response": "Water in the morning and mulch the beds."}]
for r in m.screen(rows, "evil", max_tokens=32):
    print(f"\nrow {r['index']}: ΔP = {r['delta_p']:+.2f} (data {r['p_data']:+.2f}, own answer {r['p_own']:+.2f})")
