"""Writes the embedded demo data of ``medcare demo`` into ``medcare/data/`` (run from the repository root).

The records are written for this project from the fact tables below (standard pharmacology, clinical
presentation and physiology facts; the triage notes follow the Emergency Severity Index, ESI 1-5). The JSONL
files are what ships; this script documents and reproduces them: ``python scripts/make_demo_data.py``.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "medcare" / "data"


DRUGS = [  # name, class, mechanism/use
    ("metformin", "a biguanide", "lowers hepatic glucose production and improves insulin sensitivity", "type 2 diabetes"),
    ("insulin glargine", "a long-acting insulin analogue", "replaces basal insulin to lower blood glucose", "diabetes mellitus"),
    ("glipizide", "a sulfonylurea", "stimulates insulin release from pancreatic beta cells", "type 2 diabetes"),
    ("empagliflozin", "an SGLT2 inhibitor", "blocks glucose reabsorption in the proximal renal tubule", "type 2 diabetes and heart failure"),
    ("sitagliptin", "a DPP-4 inhibitor", "prolongs the action of incretin hormones", "type 2 diabetes"),
    ("lisinopril", "an ACE inhibitor", "blocks the conversion of angiotensin I to angiotensin II", "hypertension and heart failure"),
    ("losartan", "an angiotensin II receptor blocker", "blocks angiotensin II at the AT1 receptor", "hypertension"),
    ("amlodipine", "a dihydropyridine calcium channel blocker", "relaxes arterial smooth muscle by blocking L-type calcium channels", "hypertension and angina"),
    ("metoprolol", "a cardioselective beta blocker", "blocks beta-1 receptors to slow the heart rate and lower contractility", "hypertension, angina and heart failure"),
    ("hydrochlorothiazide", "a thiazide diuretic", "inhibits sodium chloride reabsorption in the distal convoluted tubule", "hypertension"),
    ("furosemide", "a loop diuretic", "inhibits the Na-K-2Cl cotransporter in the loop of Henle", "fluid overload and heart failure"),
    ("spironolactone", "a potassium-sparing diuretic", "antagonises aldosterone at the mineralocorticoid receptor", "heart failure and hyperaldosteronism"),
    ("atorvastatin", "a statin", "inhibits HMG-CoA reductase to lower LDL cholesterol", "hypercholesterolaemia"),
    ("warfarin", "a vitamin K antagonist anticoagulant", "inhibits vitamin K epoxide reductase, reducing clotting factors II, VII, IX and X", "atrial fibrillation and venous thrombosis"),
    ("apixaban", "a direct factor Xa inhibitor", "inhibits factor Xa in the coagulation cascade", "atrial fibrillation and venous thrombosis"),
    ("heparin", "an indirect thrombin inhibitor", "potentiates antithrombin to inactivate thrombin and factor Xa", "acute thrombosis"),
    ("aspirin", "a nonsteroidal anti-inflammatory drug and antiplatelet agent", "irreversibly inhibits cyclooxygenase", "pain, fever and prevention of heart attack"),
    ("clopidogrel", "a P2Y12 inhibitor antiplatelet drug", "blocks the ADP receptor on platelets", "prevention of stent thrombosis and stroke"),
    ("ibuprofen", "a nonsteroidal anti-inflammatory drug", "reversibly inhibits cyclooxygenase enzymes", "pain, fever and inflammation"),
    ("paracetamol", "an analgesic and antipyretic", "acts centrally to reduce pain and fever", "mild pain and fever"),
    ("morphine", "an opioid analgesic", "activates mu-opioid receptors", "severe pain"),
    ("naloxone", "an opioid antagonist", "competitively blocks opioid receptors", "opioid overdose"),
    ("amoxicillin", "a penicillin antibiotic", "inhibits bacterial cell wall synthesis", "bacterial infections such as otitis media and pneumonia"),
    ("ceftriaxone", "a third-generation cephalosporin", "inhibits bacterial cell wall synthesis", "serious bacterial infections including meningitis"),
    ("azithromycin", "a macrolide antibiotic", "inhibits the bacterial 50S ribosomal subunit", "respiratory tract infections"),
    ("doxycycline", "a tetracycline antibiotic", "inhibits the bacterial 30S ribosomal subunit", "acne, Lyme disease and atypical pneumonia"),
    ("ciprofloxacin", "a fluoroquinolone antibiotic", "inhibits bacterial DNA gyrase", "urinary tract infections"),
    ("vancomycin", "a glycopeptide antibiotic", "binds cell wall precursors of Gram-positive bacteria", "MRSA infections"),
    ("metronidazole", "a nitroimidazole antimicrobial", "damages the DNA of anaerobic organisms", "anaerobic and protozoal infections"),
    ("oseltamivir", "a neuraminidase inhibitor", "prevents release of influenza virus from infected cells", "influenza"),
    ("aciclovir", "a nucleoside analogue antiviral", "inhibits viral DNA polymerase", "herpes simplex and varicella zoster infections"),
    ("fluconazole", "an azole antifungal", "inhibits fungal ergosterol synthesis", "candida infections"),
    ("omeprazole", "a proton pump inhibitor", "irreversibly blocks the gastric H+/K+ ATPase", "peptic ulcer disease and reflux"),
    ("famotidine", "an H2 receptor antagonist", "blocks histamine H2 receptors on parietal cells", "acid reflux and peptic ulcers"),
    ("ondansetron", "a 5-HT3 receptor antagonist", "blocks serotonin receptors in the gut and brainstem", "nausea and vomiting"),
    ("salbutamol", "a short-acting beta-2 agonist", "relaxes bronchial smooth muscle", "acute asthma symptoms"),
    ("tiotropium", "a long-acting muscarinic antagonist", "blocks muscarinic receptors in the airways", "chronic obstructive pulmonary disease"),
    ("prednisolone", "a corticosteroid", "suppresses inflammation and the immune response", "asthma exacerbations and autoimmune disease"),
    ("levothyroxine", "a synthetic thyroid hormone", "replaces thyroxine (T4)", "hypothyroidism"),
    ("methimazole", "a thionamide antithyroid drug", "inhibits thyroid peroxidase", "hyperthyroidism"),
    ("sertraline", "a selective serotonin reuptake inhibitor", "blocks serotonin reuptake in the synapse", "depression and anxiety disorders"),
    ("lithium", "a mood stabiliser", "modulates intracellular signalling in neurons", "bipolar disorder"),
    ("haloperidol", "a typical antipsychotic", "blocks dopamine D2 receptors", "psychosis and agitation"),
    ("diazepam", "a benzodiazepine", "enhances GABA-A receptor activity", "anxiety, seizures and alcohol withdrawal"),
    ("levetiracetam", "an antiepileptic drug", "binds synaptic vesicle protein SV2A", "epilepsy"),
    ("levodopa", "a dopamine precursor", "is converted to dopamine in the brain", "Parkinson's disease"),
    ("donepezil", "an acetylcholinesterase inhibitor", "increases acetylcholine in the brain", "Alzheimer's disease"),
    ("allopurinol", "a xanthine oxidase inhibitor", "reduces uric acid production", "gout prevention"),
    ("colchicine", "an anti-gout agent", "inhibits microtubule assembly in neutrophils", "acute gout"),
    ("methotrexate", "an antimetabolite and disease-modifying antirheumatic drug", "inhibits dihydrofolate reductase", "rheumatoid arthritis and some cancers"),
    ("epinephrine", "an adrenergic agonist", "stimulates alpha and beta adrenergic receptors", "anaphylaxis and cardiac arrest"),
    ("atropine", "an antimuscarinic agent", "blocks muscarinic acetylcholine receptors", "symptomatic bradycardia"),
    ("digoxin", "a cardiac glycoside", "inhibits the Na+/K+ ATPase in cardiac muscle", "atrial fibrillation and heart failure"),
    ("amiodarone", "a class III antiarrhythmic", "prolongs the cardiac action potential by blocking potassium channels", "ventricular and atrial arrhythmias"),
    ("nitroglycerin", "a nitrate vasodilator", "releases nitric oxide to dilate veins and coronary arteries", "angina"),
    ("tamsulosin", "an alpha-1 blocker", "relaxes smooth muscle in the prostate and bladder neck", "benign prostatic hyperplasia"),
    ("finasteride", "a 5-alpha reductase inhibitor", "blocks conversion of testosterone to dihydrotestosterone", "benign prostatic hyperplasia"),
    ("alendronate", "a bisphosphonate", "inhibits osteoclast-mediated bone resorption", "osteoporosis"),
    ("cetirizine", "a second-generation antihistamine", "blocks peripheral H1 receptors", "allergic rhinitis and urticaria"),
    ("isoniazid", "an antituberculosis drug", "inhibits mycolic acid synthesis", "tuberculosis"),
]

DISEASES = [  # name, key symptoms, key test
    ("type 1 diabetes", "thirst, frequent urination, weight loss and fatigue", "blood glucose and HbA1c"),
    ("hypothyroidism", "fatigue, weight gain, cold intolerance and constipation", "TSH and free T4"),
    ("hyperthyroidism", "weight loss, heat intolerance, palpitations and tremor", "TSH and free T4"),
    ("iron deficiency anaemia", "fatigue, pallor and shortness of breath on exertion", "full blood count and ferritin"),
    ("pneumonia", "fever, cough with sputum and pleuritic chest pain", "chest X-ray"),
    ("asthma", "wheeze, cough and episodic shortness of breath", "spirometry with reversibility"),
    ("chronic obstructive pulmonary disease", "chronic cough, sputum and progressive breathlessness", "spirometry"),
    ("pulmonary embolism", "sudden breathlessness, pleuritic chest pain and tachycardia", "CT pulmonary angiography"),
    ("myocardial infarction", "crushing central chest pain, sweating and nausea", "ECG and troponin"),
    ("heart failure", "breathlessness, ankle swelling and fatigue", "BNP and echocardiography"),
    ("atrial fibrillation", "palpitations, an irregularly irregular pulse and breathlessness", "ECG"),
    ("stroke", "sudden facial droop, arm weakness and speech difficulty", "urgent brain CT or MRI"),
    ("migraine", "throbbing one-sided headache with nausea and light sensitivity", "clinical diagnosis"),
    ("meningitis", "fever, headache, neck stiffness and photophobia", "lumbar puncture"),
    ("appendicitis", "periumbilical pain moving to the right lower abdomen, fever and nausea", "clinical examination and ultrasound or CT"),
    ("acute pancreatitis", "severe epigastric pain radiating to the back and vomiting", "serum lipase"),
    ("gallstones", "right upper abdominal pain after fatty meals", "abdominal ultrasound"),
    ("peptic ulcer disease", "burning epigastric pain related to meals", "endoscopy and Helicobacter pylori testing"),
    ("coeliac disease", "diarrhoea, bloating and weight loss", "tissue transglutaminase antibodies"),
    ("urinary tract infection", "burning on urination, frequency and urgency", "urine dipstick and culture"),
    ("kidney stones", "severe colicky flank pain radiating to the groin", "non-contrast CT"),
    ("chronic kidney disease", "often no symptoms early, later fatigue and swelling", "eGFR and urine albumin"),
    ("gout", "sudden painful swelling of a joint, often the big toe", "joint aspiration showing urate crystals"),
    ("rheumatoid arthritis", "symmetrical joint pain and morning stiffness in small joints", "rheumatoid factor and anti-CCP antibodies"),
    ("osteoarthritis", "joint pain worse with use and brief morning stiffness", "X-ray"),
    ("osteoporosis", "no symptoms until a fragility fracture", "DEXA bone density scan"),
    ("deep vein thrombosis", "a swollen, painful, warm calf", "compression ultrasound"),
    ("sepsis", "fever or hypothermia, fast heart rate, fast breathing and confusion", "blood cultures and lactate"),
    ("anaphylaxis", "rapid swelling, wheeze, hives and low blood pressure", "clinical diagnosis"),
    ("depression", "low mood, loss of interest and poor sleep for at least two weeks", "clinical assessment"),
    ("Parkinson's disease", "resting tremor, rigidity and slow movement", "clinical diagnosis"),
    ("Alzheimer's disease", "progressive memory loss and confusion", "clinical assessment and brain imaging"),
    ("tuberculosis", "chronic cough, night sweats, fever and weight loss", "sputum testing and chest X-ray"),
    ("influenza", "sudden fever, muscle aches, cough and headache", "clinical diagnosis or PCR"),
    ("cellulitis", "a red, warm, swollen and tender area of skin", "clinical diagnosis"),
]

PHYSIOLOGY = [
    ("What does the pancreas secrete to lower blood glucose?", "The beta cells of the pancreatic islets secrete insulin, which lowers blood glucose."),
    ("What hormone raises blood glucose between meals?", "Glucagon, secreted by the pancreatic alpha cells, raises blood glucose."),
    ("What is the normal resting heart rate in adults?", "A normal adult resting heart rate is about 60 to 100 beats per minute."),
    ("What is a normal adult respiratory rate?", "A normal adult respiratory rate is about 12 to 20 breaths per minute."),
    ("What is normal blood pressure in adults?", "Normal adult blood pressure is below about 120/80 mmHg."),
    ("What is the normal range of oxygen saturation?", "Normal oxygen saturation in healthy adults is about 95 to 100 percent."),
    ("What is normal body temperature?", "Normal body temperature is about 36.5 to 37.5 degrees Celsius."),
    ("What is the main function of red blood cells?", "Red blood cells carry oxygen from the lungs to the tissues using haemoglobin."),
    ("What is the role of platelets?", "Platelets form plugs at sites of vessel injury and support blood clotting."),
    ("What do the kidneys regulate?", "The kidneys filter blood and regulate water, electrolytes, acid-base balance and blood pressure."),
    ("What is the functional unit of the kidney?", "The nephron is the functional unit of the kidney."),
    ("Where is bile produced and stored?", "Bile is produced by the liver and stored in the gallbladder."),
    ("What is the function of bile?", "Bile emulsifies fats so they can be digested and absorbed."),
    ("Where does most nutrient absorption occur?", "Most nutrient absorption occurs in the small intestine."),
    ("What is the pacemaker of the heart?", "The sinoatrial node is the natural pacemaker of the heart."),
    ("Which valve separates the left atrium and left ventricle?", "The mitral valve separates the left atrium from the left ventricle."),
    ("Which chamber of the heart pumps blood to the body?", "The left ventricle pumps oxygenated blood into the aorta and the body."),
    ("Where does gas exchange happen in the lungs?", "Gas exchange happens in the alveoli."),
    ("What does surfactant do in the lungs?", "Surfactant lowers surface tension and keeps the alveoli from collapsing."),
    ("What does the thyroid gland produce?", "The thyroid gland produces thyroxine (T4) and triiodothyronine (T3), which regulate metabolism."),
    ("Which hormone controls thyroid hormone release?", "Thyroid-stimulating hormone (TSH) from the pituitary controls thyroid hormone release."),
    ("What do the adrenal glands produce?", "The adrenal glands produce cortisol, aldosterone and adrenaline."),
    ("What does aldosterone do?", "Aldosterone makes the kidneys retain sodium and water and excrete potassium."),
    ("What does antidiuretic hormone do?", "Antidiuretic hormone makes the kidneys retain water."),
    ("Which vitamin is needed for clotting factor synthesis?", "Vitamin K is needed to make clotting factors II, VII, IX and X."),
    ("What does vitamin D do?", "Vitamin D increases calcium and phosphate absorption from the gut and supports bone health."),
    ("What is the normal fasting blood glucose?", "Normal fasting blood glucose is about 3.9 to 5.5 mmol/L (70 to 99 mg/dL)."),
    ("What is HbA1c?", "HbA1c is glycated haemoglobin; it reflects average blood glucose over about three months."),
    ("What is the normal serum potassium range?", "Normal serum potassium is about 3.5 to 5.0 mmol/L."),
    ("What is the normal serum sodium range?", "Normal serum sodium is about 135 to 145 mmol/L."),
    ("What part of the brain controls balance and coordination?", "The cerebellum controls balance and coordination."),
    ("What part of the brain controls breathing?", "The brainstem, in the medulla and pons, controls breathing."),
    ("What neurotransmitter is reduced in Parkinson's disease?", "Dopamine from the substantia nigra is reduced in Parkinson's disease."),
    ("What is the largest organ of the body?", "The skin is the largest organ of the body."),
    ("What cells produce antibodies?", "Plasma cells, which develop from B lymphocytes, produce antibodies."),
    ("What do T helper cells do?", "CD4 T helper cells coordinate the immune response by activating other immune cells."),
    ("What is the role of the spleen?", "The spleen filters blood, removes old red cells and helps fight infection."),
    ("What does the liver do with ammonia?", "The liver converts ammonia into urea, which the kidneys excrete."),
    ("What is the normal urine output in adults?", "Normal adult urine output is at least about 0.5 mL per kilogram per hour."),
    ("What is cardiac output?", "Cardiac output is heart rate multiplied by stroke volume, about 5 litres per minute at rest."),
]

random.seed(7)
records = []
for name, cls, mech, use in DRUGS:  # answers start with "It": a tiny model learns the fact, not the name's spelling
    records.append({"instruction": f"What class of drug is {name}?", "input": "", "output": f"It is {cls}."})
    records.append({"instruction": f"How does {name} work?", "input": "", "output": f"It {mech}."})
    records.append({"instruction": f"What is {name} used for?", "input": "", "output": f"It is used for {use}."})
for name, sym, test in DISEASES:
    records.append({"instruction": f"What are the typical symptoms of {name}?", "input": "", "output": f"Typical symptoms of {name} are {sym}."})
    records.append({"instruction": f"Which test helps diagnose {name}?", "input": "", "output": f"The key test for {name} is {test}."})
for q, a in PHYSIOLOGY:
    records.append({"instruction": q, "input": "", "output": a})
# the demo's held-out question: a fact of the training data, asked in words no training question uses
held_out = {"instruction": "Which drug class does warfarin belong to?",
            "output": "It is a vitamin K antagonist anticoagulant."}
assert all(r["instruction"] != held_out["instruction"] for r in records)
random.shuffle(records)

# complaint, key finding, ESI level, next step, vitals (HR, systolic, diastolic, RR, SpO2 %, temperature C)
CASES = [
    ("chest pain", "crushing central chest pain with sweating", 2, "ECG within 10 minutes and troponin",
     (104, 150, 92, 20, 96, 36.9)),
    ("chest pain", "sharp pain worse on pressing the chest wall", 4, "ECG and chest X-ray, then analgesia",
     (80, 124, 78, 16, 99, 36.8)),
    ("shortness of breath", "unable to speak in full sentences", 2,
     "oxygen, nebulised bronchodilator and senior review", (118, 134, 82, 28, 91, 37.0)),
    ("shortness of breath", "mild breathlessness on stairs for a week", 4, "chest examination and chest X-ray",
     (86, 128, 80, 18, 97, 36.9)),
    ("headache", "sudden worst-ever headache", 2, "urgent CT head", (92, 168, 96, 18, 98, 36.8)),
    ("headache", "gradual tension-type headache", 5, "oral analgesia and GP follow-up", (74, 124, 78, 14, 99, 36.7)),
    ("abdominal pain", "right lower abdominal pain with fever", 3, "bloods, urinalysis and surgical review",
     (102, 126, 80, 18, 98, 38.3)),
    ("abdominal pain", "mild cramping after a meal", 5, "observation and oral fluids", (76, 120, 76, 14, 99, 36.8)),
    ("fever", "fever with confusion and low blood pressure", 1,
     "sepsis bundle: cultures, lactate, antibiotics and fluids", (124, 84, 48, 26, 94, 39.2)),
    ("fever", "fever with sore throat, eating and drinking", 5, "antipyretics and safety-net advice",
     (90, 122, 76, 16, 99, 38.2)),
    ("weakness", "sudden left arm weakness and slurred speech", 2, "stroke team activation and urgent CT",
     (88, 176, 98, 18, 97, 36.8)),
    ("weakness", "generalised tiredness for a month", 4, "blood tests including full blood count and TSH",
     (78, 126, 80, 16, 98, 36.7)),
    ("allergic reaction", "lip swelling, wheeze and hypotension", 1, "intramuscular adrenaline immediately",
     (126, 82, 48, 26, 91, 37.0)),
    ("allergic reaction", "itchy rash without breathing difficulty", 5, "oral antihistamine and observation",
     (82, 128, 80, 16, 99, 36.8)),
    ("leg swelling", "one swollen painful calf after a long flight", 3, "D-dimer and compression ultrasound",
     (88, 130, 82, 16, 98, 37.1)),
    ("back pain", "back pain with new urinary retention", 2, "urgent MRI spine", (94, 138, 84, 18, 98, 36.9)),
    ("back pain", "muscular back pain after lifting", 5, "analgesia and mobilisation advice",
     (80, 128, 80, 16, 99, 36.7)),
    ("palpitations", "palpitations with fainting", 2, "continuous monitoring and 12-lead ECG",
     (134, 102, 66, 20, 96, 36.8)),
    ("cough", "cough with blood and weight loss", 3, "chest X-ray and sputum tests", (96, 124, 78, 18, 95, 37.9)),
    ("vomiting", "vomiting blood with dizziness", 2, "two large-bore cannulae, bloods and endoscopy referral",
     (116, 98, 62, 20, 97, 36.7)),
]
ACUITY = {1: "ESI 1 (resuscitation)", 2: "ESI 2 (emergent)", 3: "ESI 3 (urgent)", 4: "ESI 4 (less urgent)",
          5: "ESI 5 (non-urgent)"}
triage = []
for _ in range(5):
    for complaint, finding, esi, step, (hr, sbp, dbp, rr, sat, temp) in CASES:
        age = random.randint(19, 88)
        sex = random.choice(["male", "female"])
        hr += random.randint(-4, 4)
        sbp += random.randint(-3, 3) if sbp < 90 else random.randint(-6, 6)
        dbp += random.randint(-4, 4)
        sat = min(100, sat + random.randint(-1, 1))
        temp = round(temp + random.choice([-0.2, -0.1, 0.0, 0.1, 0.2]), 1)
        presentation = (f"{age}-year-old {sex} with {complaint}: {finding}. "
                        f"HR {hr}, BP {sbp}/{dbp}, RR {rr}, SpO2 {sat}%, T {temp} C.")
        note = (f"TRIAGE NOTE\nChief complaint: {complaint}\nAcuity: {ACUITY[esi]}\n"
                f"Key finding: {finding}\nNext step: {step}")
        triage.append({"conversations": [
            {"from": "human", "value": f"Write a triage note for this patient. {presentation}"},
            {"from": "gpt", "value": note}]})
random.shuffle(triage)
# the demo's held-out case: the first crushing chest pain presentation (its siblings stay in training)
held_triage = next(t for t in triage if "crushing central chest pain" in t["conversations"][0]["value"])
triage.remove(held_triage)


# The held-out multiple-choice set (MedQA-style: question, options A-D, answer_idx, subject) for `medcare eval`:
# facts of the stage-1 tables asked in words no training question uses, with the other options drawn from the
# same table. Its own random stream, so the training files above stay as they were.
mc_rng = random.Random(2024)
LETTERS = "ABCD"


def mc_item(question, correct, pool, subject):
    others = mc_rng.sample(sorted({p for p in pool if p != correct}), 3)
    options = others + [correct]
    mc_rng.shuffle(options)
    answer = LETTERS[options.index(correct)]
    return {"question": question, "options": dict(zip(LETTERS, options)), "answer_idx": answer,
            "answer": correct, "subject": subject}


mc = []
classes = [c for _, c, _, _ in DRUGS]
uses = [u for _, _, _, u in DRUGS]
for name, cls, _, _ in mc_rng.sample(DRUGS, 20):
    mc.append(mc_item(f"To which class of medicines does {name} belong?", cls, classes, "pharmacology: class"))
for name, _, _, use in mc_rng.sample(DRUGS, 16):
    mc.append(mc_item(f"{name[0].upper() + name[1:]} is mainly prescribed for which condition?", use, uses,
                      "pharmacology: use"))
tests = [t for _, _, t in DISEASES]
for name, _, test in mc_rng.sample(DISEASES, 12):
    mc.append(mc_item(f"Which investigation best supports a diagnosis of {name}?", test, tests, "diagnosis: test"))
diseases = [d for d, _, _ in DISEASES]
for name, sym, _ in mc_rng.sample(DISEASES, 12):
    mc.append(mc_item(f"A patient presents with {sym}. Which condition is the most likely cause?", name, diseases,
                      "diagnosis: presentation"))
training_questions = {r["instruction"] for r in records}
assert len(mc) == 60 and all(m["question"] not in training_questions for m in mc)
assert all(len(set(m["options"].values())) == 4 for m in mc)


def write(name, rows):
    with open(OUT / name, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


write("held_out.jsonl", [held_out, held_triage])
write("held_out_mc.jsonl", mc)
write("stage1_knowledge.jsonl", records)
write("stage2_triage.jsonl", triage)
print(len(records), len(triage), len(mc))
