"""The benchmarks' built-in prompt text: plain English prose written for flashjax, varied enough that a
prompt of a few hundred tokens does not repeat itself. `--prompt-text FILE` replaces it."""

PROMPT_TEXT = """\
The history of computing is a story of machines that grew smaller, faster and cheaper while the problems
they were asked to solve grew larger. The first electronic computers filled rooms, drew as much power as
a small factory and were programmed by rewiring panels of plugs and switches. Their designers soon saw
that a program could be stored in the same memory as the numbers it worked on, and that idea turned
software into a thing of its own: something that could be written, copied, traded and improved without
touching the machine at all.

Memory was the scarce resource from the beginning. Early machines kept their working numbers in delay
lines, where pulses of sound travelled through tubes of mercury and were caught and sent around again,
or on the faces of cathode ray tubes, where a dot of charge faded unless it was refreshed many times a
second. Magnetic cores replaced both: tiny rings of ferrite threaded on a grid of wires, each holding a
single bit that survived when the power was switched off. A program that did not fit had to be split by
hand into pieces that were read from a drum or a tape when they were needed, and a good programmer knew
exactly how long the drum took to turn.

That habit of moving data between a small, fast memory and a large, slow one never went away. It only
changed its name. Virtual memory let the operating system do the splitting, paging the parts of a
program it had not touched for a while out to disk and bringing them back on demand. Caches put a few
kilobytes of very fast memory beside the processor and kept in them whatever had been used most
recently, on the bet that it would soon be used again. The bet usually wins, because programs tend to
return to the same instructions and the same data, and because data that sit next to each other are
often needed together.

Disks themselves went through the same transformation. A spinning platter rewards long, sequential
reads: once the head has found the right track, the bytes arrive quickly, but every jump to another
place costs milliseconds while the arm moves and the platter turns. Flash memory changed the balance.
It has no moving parts, so a random read costs far less, yet it still prefers large requests to small
ones, and it serves many requests at once better than one at a time. A program that reads flash well
asks for its data in generous chunks and keeps several requests in flight.

Consider a baker who runs a small shop on a busy street. The counter holds only a few trays, the back
room holds many more, and the flour arrives once a week from a mill in the next valley. Each morning the
baker decides which loaves go on the counter, which stay in the back and how much dough to prepare for
the afternoon. A good baker watches what sells, notices that rye bread goes quickly on rainy days and
that the sweet rolls vanish when school lets out, and arranges the trays so that the busiest hands reach
the right shelf without walking to the back. The shop is never large enough to hold everything, and it
does not need to be.

Language models face a similar arrangement. Their weights are large tables of numbers, and generating
each new word means multiplying a small vector by most of those tables. When the tables fit in the
fastest memory, the work is limited by how quickly the numbers can be streamed to the arithmetic units.
When they do not fit, the model must leave part of itself on slower storage and fetch it as needed. The
question is then which parts to keep close at hand, how to find out early what will be needed next, and
how to read it in pieces large enough that the storage can deliver them efficiently.

Not every part of such a model is equally busy. In the feed-forward layers, many units produce nothing
useful for a given word: their outputs are zero or close to it, and skipping them changes the result
very little. If a cheap predictor can guess which units will matter before the layer runs, only those
units need to be read. If the units that matter for one word tend to matter for the next few words as
well, a small window of recently used units can stay in memory and only the newcomers need to be loaded.
And if the pieces of each unit are stored side by side, one read brings all of them at once.

Railways solved a related problem long before computers existed. A station cannot hold every carriage
the network owns, so the timetable decides which trains stop where, and the yard keeps the carriages
most likely to be needed in the morning near the front. Freight that travels together is coupled
together, because one locomotive pulling a long train is cheaper than many pulling short ones. A
dispatcher who knows that the harvest is coming sends empty wagons to the farming towns a week ahead,
so that they are waiting when the grain is ready rather than arriving after it has started to spoil.

Weather forecasting offers another example of planning under limited resources. A forecaster cannot
measure the atmosphere everywhere, so the models interpolate between stations, balloons and satellites,
and they spend their computing effort where the weather is changing fastest. A calm high-pressure system
over the ocean needs little attention, while a line of thunderstorms crossing the plains deserves a
finer grid and more frequent updates. The art lies in deciding, early and cheaply, where the expensive
work will pay off, and in accepting small errors elsewhere in exchange for a forecast that arrives in
time to be useful.

Libraries have practised the same discipline for centuries. The reading room holds the reference works
that everyone consults, the open shelves hold the books borrowed often, and the stacks in the basement
hold everything else, retrieved by a clerk when a reader fills in a slip. A library that kept every
volume in the reading room would need a building the size of a city; one that kept everything in the
basement would make every reader wait. The catalogue, the placement of the shelves and the habits of
the clerks together decide how long a reader waits, and a well run library makes most waits short.

Measurement keeps all of these systems honest. A baker counts the loaves left at closing time, a
railway counts the empty seats, a forecaster compares yesterday's prediction with what actually fell
from the sky, and an engineer who moves data between memories counts the bytes read, the time spent
waiting for them and the time spent computing with them. Without such counts it is easy to optimise the
wrong thing: to make the arithmetic faster while the program spends most of its time waiting for the
disk, or to read less data in a way that costs more time than it saves.

Good measurements are repeated, because a single run can be disturbed by other work on the same machine,
by a cache that happened to be warm, or by a background task that woke up at the wrong moment. They are
reported with their spread as well as their middle value, so that a reader can tell a real difference
from noise. They state what was measured and what was left out, such as the time spent compiling a
program the first time it runs. And they compare like with like: the same model, the same prompt, the
same number of generated words and the same machine, so that the only thing that changes is the method
under test.
"""
